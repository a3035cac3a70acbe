// featurestore: the small set of d3-jetpack helpers that the circuit-tracer viewer calls, on top of d3 v7.
//
// The viewer was written against a d3-jetpack fork loaded after d3. The npm package d3-jetpack 2.x bundles its
// own copy of d3 and decorates that copy, so the page's d3 never gets the helpers. This file decorates the d3
// already on the page instead, and only with what the viewer uses:
//   selection: append/insert('tag.class#id'), appendMany, selectAppend, parent, at, st, translate
//   d3: nestBy, clamp, conventions (with drawAxis and 's'/'c'/'d' layers), attachTooltip
// Written for featurestore; behaviour follows what the viewer's code expects of each call.
(function (d3) {
  'use strict'
  if (!d3 || !d3.selection) throw new Error('viewer_compat.js needs d3 loaded first')

  var proto = d3.selection.prototype
  var nativeAppend = proto.append
  var nativeInsert = proto.insert

  // 'div.a.b#id' -> {tag: 'div', classes: ['a', 'b'], id: 'id'}
  function parseName(name) {
    var parts = name.split(/(?=[.#])/)
    var spec = {tag: parts[0] || 'div', classes: [], id: null}
    parts.slice(1).forEach(function (part) {
      if (part[0] === '.') spec.classes.push(part.slice(1))
      else spec.id = part.slice(1)
    })
    return spec
  }

  function decorate(selection, spec) {
    if (spec.classes.length) selection.attr('class', spec.classes.join(' '))
    if (spec.id) selection.attr('id', spec.id)
    return selection
  }

  proto.append = function (name) {
    if (typeof name !== 'string' || !/[.#]/.test(name)) return nativeAppend.apply(this, arguments)
    var spec = parseName(name)
    return decorate(nativeAppend.call(this, spec.tag), spec)
  }

  proto.insert = function (name, before) {
    if (typeof name !== 'string' || !/[.#]/.test(name)) return nativeInsert.apply(this, arguments)
    var spec = parseName(name)
    return decorate(nativeInsert.call(this, spec.tag, before), spec)
  }

  // one new element per datum, under each element of the selection
  proto.appendMany = function (name, data) {
    return this.selectAll(null).data(data).enter().append(name)
  }

  // the first child matching name ('tag.class'), appended when there is none
  proto.selectAppend = function (name) {
    return this.select(function () {
      var found = this.querySelector(':scope > ' + name)
      if (found) return found
      return nativeAppend.call(d3.select(this), parseName(name).tag).call(decorate, parseName(name)).node()
    })
  }

  proto.parent = function () {
    return this.select(function () { return this.parentNode })
  }

  // attributes: camelCase keys become kebab-case (strokeWidth -> stroke-width); SVG's camelCase names are kept
  var camelAttributes = {viewBox: 1, preserveAspectRatio: 1, gradientUnits: 1, gradientTransform: 1, spreadMethod: 1,
    patternUnits: 1, markerWidth: 1, markerHeight: 1, markerUnits: 1, refX: 1, refY: 1, textLength: 1,
    lengthAdjust: 1, startOffset: 1, stdDeviation: 1}

  function kebab(name) {
    return name.replace(/([a-z\d])([A-Z])/g, '$1-$2').toLowerCase()
  }

  proto.at = function (name, value) {
    if (typeof name === 'object') {
      for (var key in name) this.attr(camelAttributes[key] ? key : kebab(key), name[key])
      return this
    }
    var attribute = camelAttributes[name] ? name : kebab(name)
    return arguments.length === 1 ? this.attr(attribute) : this.attr(attribute, value)
  }

  // styles: camelCase keys become kebab-case; numbers get 'px' for length properties. As in the viewer's jetpack,
  // a property counts as a length when its name occurs inside this list (so 'height' matches via 'line-height').
  var lengthProperties = ' top left bottom right width height min-width max-width min-height max-height ' +
    'margin margin-top margin-right margin-bottom margin-left padding padding-top padding-right padding-bottom ' +
    'padding-left border border-width border-top-width border-right-width border-bottom-width border-left-width ' +
    'border-radius font-size line-height stroke-width gap row-gap column-gap letter-spacing text-indent '

  function withPx(value) {
    return typeof value === 'number' ? value + 'px' : value
  }

  function setStyle(selection, name, value) {
    var property = kebab(name)
    if (lengthProperties.indexOf(property) === -1) return selection.style(property, value)
    if (typeof value === 'function') {
      return selection.style(property, function () { return withPx(value.apply(this, arguments)) })
    }
    return selection.style(property, withPx(value))
  }

  proto.st = function (name, value) {
    if (typeof name === 'object') {
      for (var key in name) setStyle(this, key, name[key])
      return this
    }
    return arguments.length === 1 ? this.style(kebab(name)) : setStyle(this, name, value)
  }

  // translate([x, y]) or translate(fn -> [x, y]); translate(v, 0) and translate(v, 1) move along one axis only.
  // SVG elements get a transform attribute, HTML elements a CSS transform.
  proto.translate = function (position, axis) {
    function point(d, i, nodes) {
      var p = typeof position === 'function' ? position.call(this, d, i, nodes) : position
      if (axis === 0) return [p, 0]
      if (axis === 1) return [0, p]
      return p
    }
    var first = this.node()
    if (!first) return this
    if (first instanceof SVGElement) {
      return this.attr('transform', function (d, i, nodes) {
        var p = point.call(this, d, i, nodes)
        return 'translate(' + p[0] + ',' + p[1] + ')'
      })
    }
    return this.style('transform', function (d, i, nodes) {
      var p = point.call(this, d, i, nodes)
      return 'translate(' + p[0] + 'px,' + p[1] + 'px)'
    })
  }

  // groups in order of first appearance; each group is an array of items with a .key
  d3.nestBy = function (items, keyFn) {
    var groups = new Map()
    Array.from(items || []).forEach(function (item, i) {
      var key = keyFn(item, i)
      if (!groups.has(key)) {
        var group = []
        group.key = key
        groups.set(key, group)
      }
      groups.get(key).push(item)
    })
    return Array.from(groups.values())
  }

  d3.clamp = function (low, value, high) {
    return Math.max(low, Math.min(value, high))
  }

  // A chart frame: margins, inner width/height, default scales and axes, and stacked layers
  // ('s' svg > g shifted by the margins, 'c' a hi-dpi canvas 2d context shifted the same way, 'd' a div).
  d3.conventions = function (options) {
    var c = Object.assign({}, options || {})
    var margin = Object.assign({}, c.margin || {})
    ;['top', 'right', 'bottom', 'left'].forEach(function (side) {
      if (margin[side] === undefined || margin[side] === null) margin[side] = 20
    })
    c.margin = margin
    c.sel = c.sel || d3.select('body')
    var node = c.sel.node()
    var totalWidth = c.totalWidth || (node && node.offsetWidth) || 960
    var totalHeight = c.totalHeight || (node && node.offsetHeight) || 500
    c.width = c.width || totalWidth - margin.left - margin.right
    c.height = c.height || totalHeight - margin.top - margin.bottom
    c.totalWidth = c.width + margin.left + margin.right
    c.totalHeight = c.height + margin.top + margin.bottom

    if (node && getComputedStyle(node).position === 'static') c.sel.style('position', 'relative')

    c.x = c.x || d3.scaleLinear().range([0, c.width])
    c.y = c.y || d3.scaleLinear().range([c.height, 0])
    c.xAxis = c.xAxis || d3.axisBottom(c.x)
    c.yAxis = c.yAxis || d3.axisLeft(c.y)

    var ratio = window.devicePixelRatio || 1
    c.layers = (c.layers || 's').split('').map(function (kind) {
      if (kind === 's') {
        var g = c.sel.append('svg')
          .style('position', 'absolute').style('left', 0).style('top', 0)
          .attr('width', c.totalWidth).attr('height', c.totalHeight)
          .append('g').attr('transform', 'translate(' + margin.left + ',' + margin.top + ')')
        if (!c.svg) c.svg = g
        return g
      }
      if (kind === 'c') {
        var canvas = c.sel.append('canvas')
          .attr('width', Math.round(c.totalWidth * ratio)).attr('height', Math.round(c.totalHeight * ratio))
          .style('position', 'absolute').style('left', 0).style('top', 0)
          .style('width', c.totalWidth + 'px').style('height', c.totalHeight + 'px')
        var ctx = canvas.node().getContext('2d')
        ctx.scale(ratio, ratio)
        ctx.translate(margin.left, margin.top)
        return ctx
      }
      if (kind === 'd') {
        return c.sel.append('div').style('position', 'absolute')
          .style('left', margin.left + 'px').style('top', margin.top + 'px')
          .style('width', c.width + 'px').style('height', c.height + 'px')
      }
      throw new Error('d3.conventions: unknown layer type ' + kind)
    })

    c.drawAxis = function (target) {
      var svg = target || c.svg
      var xAxisSel = svg.append('g').attr('class', 'x axis')
        .attr('transform', 'translate(0,' + c.height + ')').call(c.xAxis)
      var yAxisSel = svg.append('g').attr('class', 'y axis').call(c.yAxis)
      return {xAxisSel: xAxisSel, yAxisSel: yAxisSel}
    }
    return c
  }

  // selection.call(d3.attachTooltip, tooltipSel, fields): show the datum's fields in a fixed tooltip on hover
  d3.attachTooltip = function (selection, tooltipSel, fields) {
    tooltipSel = tooltipSel || d3.select('.tooltip')
    if (!tooltipSel.size()) return selection
    selection
      .on('mouseover.attachTooltip', function (event, d) {
        var keys = fields && fields.length ? fields : Object.keys(d || {})
        tooltipSel.html('')
        keys.forEach(function (key) {
          if (d == null || typeof d[key] === 'object' || typeof d[key] === 'function') return
          var row = tooltipSel.append('div')
          row.append('span').text(key + ': ')
          row.append('b').text(d[key])
        })
        tooltipSel.classed('tooltip-hidden', false)
      })
      .on('mousemove.attachTooltip', function (event) {
        var box = tooltipSel.node().getBoundingClientRect()
        var left = d3.clamp(20, event.clientX - box.width / 2, window.innerWidth - box.width - 20)
        var top = window.innerHeight > event.clientY + 20 + box.height ? event.clientY + 20 : event.clientY - box.height - 20
        tooltipSel.style('left', left + 'px').style('top', top + 'px')
      })
      .on('mouseout.attachTooltip', function () {
        tooltipSel.classed('tooltip-hidden', true)
      })
    return selection
  }
})(window.d3)
