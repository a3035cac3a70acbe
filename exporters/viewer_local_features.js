// featurestore serve: route the viewer's feature fetches to this server, whatever the graph's scan says.
//
// The viewer (circuit-tracer 0.5.0) looks a feature up by its graph's scan:
//   './data/<dir>'  -> ./data/<dir>/<id>.json          (this server answers those itself)
//   Hub repo id     -> HEAD https://huggingface.co/<repo>/resolve/<rev>/[<sub>/]features/index.json.gz, then a ranged
//                      read of layer_<L>.bin when it exists
//   anything else   -> https://d1fk9w8oratjix.cloudfront.net/features/<scan>/<id>.json
// With a local feature source, the index probe is answered "not found" here, so the viewer takes the last branch,
// and that URL is sent to /features/<id>.json on this server, which always returns a valid document (a dead one
// for features it does not have). Nothing leaves the machine; the viewer's code is untouched.
(function () {
  'use strict'
  var config = window.featurestoreServe || {}
  if (!config.localFeatures) return

  var nativeFetch = window.fetch.bind(window)
  var hubFeatureFile = /^https:\/\/huggingface\.co\/.+\/resolve\/[^/]+\/(?:.+\/)?features\/([^/?#]+)$/
  var cdnFeature = /^https:\/\/d1fk9w8oratjix\.cloudfront\.net\/features\/.+\/(\d+)\.json$/

  function urlOf(input) {
    return typeof input === 'string' ? input : input instanceof URL ? input.href : input.url
  }

  window.fetch = function (input, init) {
    var url = urlOf(input)
    var hub = hubFeatureFile.exec(url)
    if (hub) {
      if (hub[1] === 'index.json.gz') {
        return Promise.resolve(new Response(null, {status: 404, statusText: 'features are served locally'}))
      }
      return nativeFetch('/features/' + hub[1], init)
    }
    var cdn = cdnFeature.exec(url)
    if (cdn) return nativeFetch('/features/' + cdn[1] + '.json', init)
    return nativeFetch(input, init)
  }
})()
