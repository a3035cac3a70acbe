// featurestore feature browser: plain JS, no build step, no network access beyond this server.
// Every piece of store text (descriptions, tokens, labels) is inserted with textContent, never as HTML.
'use strict'
;(function () {
  const config = window.featurestoreBrowser || {}
  const app = document.getElementById('app')
  const SVG = 'http://www.w3.org/2000/svg'

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag)
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue
      if (key === 'text') node.textContent = value
      else if (key === 'class') node.className = value
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value)
      else node.setAttribute(key, value)
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child)
    return node
  }
  const fmt = (x, digits = 3) => (x === null || x === undefined ? '' : Number(x).toPrecision(digits))
  const pct = x => (x === null || x === undefined ? '' : x === 0 ? '0%' : (100 * x).toFixed(x < 0.001 ? 4 : 2) + '%')
  // a token in quotes, with its whitespace visible; \xNN bytes stay as the store shows them
  const quote = t => '"' + String(t).replace(/\n/g, '\\n').replace(/\t/g, '\\t').replace(/\r/g, '\\r') + '"'
  const featureUrl = (source, layer, feature) => `/feature/${source}/${layer}/${feature}`
  const shade = (a, max) => (a > 0 ? `rgba(224, 115, 31, ${Math.min(1, 0.15 + 0.85 * a / (max || 1)).toFixed(3)})` : '')

  async function api(name, params) {
    const response = await fetch(`/api/${name}?` + new URLSearchParams(params || {}))
    const body = await response.json()
    if (!response.ok) throw new Error(body.error || response.statusText)
    return body
  }

  function showError(where, error) {
    where.replaceChildren(el('p', { class: 'error', text: 'error: ' + error.message }))
  }

  function tokenSpan(text, act, max, extra) {
    const shown = text.replace(/\n/g, '↵\n')
    const span = el('span', { class: 'tok' + (text.includes('\n') ? ' nl' : '') + (extra ? ' ' + extra : ''), text: shown })
    const bg = shade(act, max)
    if (bg) span.style.background = bg
    if (act > 0) span.title = 'activation ' + fmt(act, 4)
    return span
  }

  function sparkline(counts, width = 80, height = 18) {
    const svg = document.createElementNS(SVG, 'svg')
    svg.setAttribute('class', 'spark')
    svg.setAttribute('width', width)
    svg.setAttribute('height', height)
    const peak = Math.max(1, ...counts)
    const w = width / counts.length
    counts.forEach((c, i) => {
      if (!c) return
      const h = Math.max(1, Math.log1p(c) / Math.log1p(peak) * height)
      const rect = document.createElementNS(SVG, 'rect')
      rect.setAttribute('x', (i * w).toFixed(2))
      rect.setAttribute('y', (height - h).toFixed(2))
      rect.setAttribute('width', Math.max(1, w - 1).toFixed(2))
      rect.setAttribute('height', h.toFixed(2))
      svg.append(rect)
    })
    return svg
  }

  // ---- the list ----

  async function listView() {
    const params = Object.fromEntries(new URLSearchParams(location.search))
    const overview = await api('overview')
    const form = el('form', { class: 'filters', id: 'filters' })
    const field = (label, input) => el('label', {}, label, input)
    const select = (name, options, value) => {
      const s = el('select', { name })
      for (const [v, t] of options) s.append(el('option', { value: v, text: t, selected: String(v) === String(value ?? '') }))
      return s
    }
    const input = (name, placeholder) => el('input', { name, placeholder, value: params[name] || '' })
    const layers = [...new Set(overview.layers.map(l => l.layer))]
    form.append(
      field('source', select('source', overview.sources.map(s => [s, s]), params.source || overview.sources[0])),
      field('layer', select('layer', [['', 'all'], ...layers.map(l => [l, l])], params.layer)),
      field('min freq', input('min_freq', 'e.g. 0.001')),
      field('max freq', input('max_freq', 'e.g. 0.1')),
      field('category', select('category', [['', 'any'], ...overview.categories.map(c => [c, c])], params.category)),
      field('explained', select('explained', [['', 'any'], ['yes', 'yes'], ['no', 'no']], params.explained)),
      field('description', input('q', 'search descriptions')),
      field('top-logit token', input('logit', 'e.g. the')),
      field('fires most on token', input('token', 'e.g. wait')),
      field('sort', select('sort', [['layer', 'layer/feature'], ['freq', 'frequency'], ['max_act', 'max activation'],
        ['count', 'activations'], ['description', 'description']], params.sort)),
      field('order', select('order', [['', 'default'], ['asc', 'ascending'], ['desc', 'descending']], params.order)),
      el('button', { type: 'submit', id: 'search', text: 'Search' }))
    form.addEventListener('submit', event => {
      event.preventDefault()
      const next = {}
      for (const [k, v] of new FormData(form)) if (v) next[k] = v
      history.pushState(null, '', '/features?' + new URLSearchParams(next))
      route()
    })
    const results = el('div', { id: 'results' }, el('p', { class: 'muted', text: 'loading…' }))
    app.replaceChildren(el('h2', { text: `Features of ${overview.store}` }), form, results)
    try {
      const page = await api('features', params)
      results.replaceChildren(featureTable(page, params))
    } catch (error) { showError(results, error) }
  }

  function featureTable(page, params) {
    const table = el('table', { id: 'feature-table' },
      el('tr', {}, ...['feature', 'description', 'frequency', 'max act', 'density', 'top logits', 'category']
        .map(t => el('th', { text: t }))))
    const byLayer = {}
    for (const row of page.rows) {
      const spark = el('td', { class: 'spark-cell' })
      ;(byLayer[row.layer] = byLayer[row.layer] || []).push([row.feature, spark])
      table.append(el('tr', { class: 'feature-row', 'data-layer': row.layer, 'data-feature': row.feature },
        el('td', {}, el('a', { href: featureUrl(row.source, row.layer, row.feature), text: `L${row.layer}/${row.feature}` })),
        el('td', { class: 'description', text: row.description || '' }),
        el('td', { class: 'num', text: pct(row.activation_freq) }),
        el('td', { class: 'num', text: fmt(row.max_act) }),
        spark,
        el('td', { class: 'logits', text: row.top_logits.map(quote).join(' ') }),
        el('td', { text: row.category || '' })))
    }
    const source = params.source || (page.rows[0] && page.rows[0].source) || 'transcoder'
    for (const [layer, cells] of Object.entries(byLayer)) {
      api('sparklines', { source, layer, features: cells.map(c => c[0]).join(',') }).then(spark => {
        for (const [feature, cell] of cells) cell.append(sparkline(spark[feature] || []))
      }).catch(() => {})
    }
    const pager = el('div', { class: 'pager' })
    const go = offset => () => {
      history.pushState(null, '', '/features?' + new URLSearchParams({ ...params, offset }))
      route()
    }
    if (page.offset > 0) pager.append(el('button', { text: '← previous', onclick: go(Math.max(0, page.offset - page.limit)) }))
    pager.append(el('span', { id: 'total', text: `${page.offset + 1}–${page.offset + page.rows.length} of ${page.total}` }))
    if (page.offset + page.limit < page.total) pager.append(el('button', { text: 'next →', onclick: go(page.offset + page.limit) }))
    return el('div', {}, pager, table)
  }

  // ---- a feature page ----

  async function featureView(source, layer, feature) {
    app.replaceChildren(el('p', { class: 'muted', text: 'loading…' }))
    let page
    try { page = await api('feature', { source, layer, feature }) } catch (error) { return showError(app, error) }
    const title = el('h2', { id: 'feature-title', text: `${source} L${layer}/${feature}` })
    const parts = [title]
    const stats = page.stats
    if (stats && stats.description) parts.push(el('p', { id: 'feature-description', text: stats.description }))
    if (page.note) parts.push(el('p', { class: 'muted', id: 'feature-note', text: page.note }))
    if (page.dead) parts.push(el('p', { class: 'muted', text: 'This feature never fired in the store.' }))
    if (stats) {
      parts.push(el('table', { id: 'stats' }, ...[
        ['activations', stats.activation_count], ['frequency', pct(stats.activation_freq)],
        ['max activation', fmt(stats.max_act, 4)], ['mean activation', fmt(stats.mean_act, 4)],
        ['category', stats.category || '—']].map(([k, v]) => el('tr', {}, el('th', { text: k }), el('td', { text: String(v) })))))
      parts.push(el('h3', { text: 'Activation histogram' }), histogram(page.histogram))
    }
    const side = el('div', { class: 'cols' },
      logitList('Top logits (logit lens)', page.logit_lens.top, 'top-logits'),
      logitList('Bottom logits', page.logit_lens.bottom, 'bottom-logits'))
    if (page.breakdown) {
      side.append(breakdown('Regions', page.breakdown.region, 'regions'), breakdown('Domains', page.breakdown.domain, 'domains'))
    }
    parts.push(side, interp(page.interp), graphs(page.graphs))
    if (page.groups) {
      const groups = el('section', { id: 'groups' }, el('h3', { text: 'Examples by activation range' }))
      for (const group of page.groups) groups.append(exampleGroup(group, stats.max_act))
      parts.push(groups)
    }
    app.replaceChildren(...parts)
  }

  function histogram(hist) {
    const width = 480, height = 90
    const svg = document.createElementNS(SVG, 'svg')
    svg.setAttribute('class', 'hist')
    svg.setAttribute('id', 'histogram')
    svg.setAttribute('width', width)
    svg.setAttribute('height', height + 14)
    const peak = Math.max(1, ...hist.counts)
    const w = width / hist.counts.length
    hist.counts.forEach((c, i) => {
      const h = c ? Math.max(1, c / peak * height) : 0
      const rect = document.createElementNS(SVG, 'rect')
      rect.setAttribute('class', 'hist-bar')
      rect.setAttribute('data-count', c)
      rect.setAttribute('x', (i * w).toFixed(2))
      rect.setAttribute('y', (height - h).toFixed(2))
      rect.setAttribute('width', Math.max(1, w - 1).toFixed(2))
      rect.setAttribute('height', h.toFixed(2))
      const tip = document.createElementNS(SVG, 'title')
      tip.textContent = `${fmt(hist.edges[i])}–${fmt(hist.edges[i + 1])}: ${c}`
      rect.append(tip)
      svg.append(rect)
    })
    for (const [x, anchor, label] of [[0, 'start', '0'], [width, 'end', fmt(hist.edges[hist.edges.length - 1])]]) {
      const text = document.createElementNS(SVG, 'text')
      text.setAttribute('x', x)
      text.setAttribute('y', height + 12)
      text.setAttribute('text-anchor', anchor)
      text.setAttribute('font-size', '10')
      text.textContent = label
      svg.append(text)
    }
    return svg
  }

  function logitList(title, items, id) {
    return el('section', { id }, el('h3', { text: title }),
      el('table', {}, ...items.map(i => el('tr', {}, el('td', { class: 'token', text: quote(i.token) }),
        el('td', { class: 'num', text: fmt(i.value) })))))
  }

  function breakdown(title, items, id) {
    return el('section', { id }, el('h3', { text: title }),
      el('table', {}, el('tr', {}, el('th', { text: 'name' }), el('th', { text: 'this feature' }), el('th', { text: 'all tokens' })),
        ...items.map(i => el('tr', {}, el('td', { text: i.name }),
          el('td', {}, el('span', { class: 'bar', style: `width:${(60 * i.share).toFixed(1)}px` }), ' ' + pct(i.share)),
          el('td', {}, el('span', { class: 'bar base', style: `width:${(60 * i.baseline).toFixed(1)}px` }), ' ' + pct(i.baseline))))))
  }

  function interp(results) {
    const section = el('section', { id: 'interp' }, el('h3', { text: 'Classification and auto-interp' }))
    let any = false
    for (const [name, rows] of Object.entries(results)) {
      if (!rows.length) continue
      any = true
      const keys = Object.keys(rows[0])
      section.append(el('h4', { text: name }), el('table', { class: 'interp-' + name },
        el('tr', {}, ...keys.map(k => el('th', { text: k }))),
        ...rows.map(r => el('tr', {}, ...keys.map(k => el('td', { text: typeof r[k] === 'number' ? fmt(r[k]) : String(r[k] ?? '') }))))))
    }
    if (!any) section.append(el('p', { class: 'muted', text: 'No judge results for this feature yet.' }))
    return section
  }

  function graphs(items) {
    const section = el('section', { id: 'graphs' }, el('h3', { text: 'Attribution graphs with this feature' }))
    if (!config.graphs) section.append(el('p', { class: 'muted', text: 'Start the server with --graphs DIR to list graphs.' }))
    else if (!items.length) section.append(el('p', { class: 'muted', text: 'None of the graphs contains this feature.' }))
    for (const g of items) {
      const href = '/index.html?' + new URLSearchParams({ slug: g.slug, clickedId: g.node_id })
      section.append(el('div', {}, el('a', { class: 'graph-link', href, text: `${g.slug} (node ${g.node_id})` })))
    }
    return section
  }

  function exampleGroup(group, max) {
    const box = el('div', { class: 'group', 'data-kind': group.kind },
      el('h3', { text: `${group.label} — ${group.count} activations` }))
    if (!group.examples.length) box.append(el('p', { class: 'muted', text: 'no activations in this range' }))
    for (const ex of group.examples) {
      const ctx = el('div', { class: 'ctx' })
      ex.text.forEach((t, i) => ctx.append(tokenSpan(t, ex.acts[i], max, i === ex.index ? 'active' : '')))
      const where = [`act ${fmt(ex.act, 4)}`, ex.domain, ex.region,
        ex.thinking_pos === null ? null : `thinking ${(100 * ex.thinking_pos).toFixed(0)}%`, `seq ${ex.seq_id} pos ${ex.pos}`]
      box.append(el('div', { class: 'example', 'data-act': ex.act },
        el('div', { class: 'meta', text: where.filter(Boolean).join(' · ') }), ctx))
    }
    return box
  }

  // ---- trace and interventions ----

  function traceView() {
    if (!config.model) {
      app.replaceChildren(el('p', { class: 'muted', text: 'Start the server with --model CHECKPOINT to trace texts.' }))
      return
    }
    const text = el('textarea', { id: 'trace-text', rows: 4, placeholder: 'text (the user turn in a data format)' })
    const response = el('textarea', { id: 'trace-response', rows: 3, placeholder: 'assistant turn (optional, data formats only)' })
    const format = el('select', { id: 'trace-format' })
    for (const f of [config.format, 'raw', 'deepseek', 'qwen', 'chat-template'].filter((f, i, a) => a.indexOf(f) === i)) {
      format.append(el('option', { value: f, text: f === config.format ? `${f} (the store's format)` : f }))
    }
    const out = el('div', { id: 'trace-result' })
    const run = el('button', { id: 'trace-run', text: 'Trace', onclick: async () => {
      out.replaceChildren(el('p', { class: 'muted', text: 'running the model…' }))
      const params = { text: text.value, format: format.value }
      if (response.value) params.response = response.value
      history.replaceState(null, '', '/trace?' + new URLSearchParams(params))  // a trace is a link too
      try { renderTrace(out, await api('trace', params), params) } catch (error) { showError(out, error) }
    } })
    app.replaceChildren(el('h2', { text: 'Which features fire on this text' }), text, response,
      el('div', {}, 'format ', format, ' ', run), out)
    const given = new URLSearchParams(location.search)
    if (given.get('text')) {
      text.value = given.get('text')
      response.value = given.get('response') || ''
      if ([...format.options].some(o => o.value === given.get('format'))) format.value = given.get('format')
      run.click()
    }
  }

  function renderTrace(out, trace, params) {
    const tokens = el('div', { class: 'ctx trace-tokens', id: 'trace-tokens' })
    const perToken = el('div', { id: 'token-features' })
    const spans = trace.text.map((t, pos) => {
      const span = tokenSpan(t, 0, 1)
      span.dataset.pos = pos
      span.addEventListener('click', () => showToken(pos))
      tokens.append(span)
      return span
    })
    const showToken = pos => {
      spans.forEach((s, i) => s.classList.toggle('selected', i === pos))
      perToken.replaceChildren(el('h4', { text: `Token ${pos} ${quote(trace.text[pos])}` }),
        el('table', {}, ...trace.per_token[pos].map(f => el('tr', {},
          el('td', {}, el('a', { href: featureUrl('transcoder', f.layer, f.feature), text: `L${f.layer}/${f.feature}` })),
          el('td', { class: 'num', text: fmt(f.act, 4) }), el('td', { text: f.description || '' })))))
    }
    const showFeature = f => {
      const max = Math.max(...f.acts)
      spans.forEach((s, i) => { s.style.background = shade(f.acts[i], max); s.title = f.acts[i] ? fmt(f.acts[i], 4) : '' })
    }
    const table = el('table', { id: 'trace-features' }, el('tr', {}, ...['ablate', 'scale', 'feature', 'max act', 'tokens', 'description']
      .map(t => el('th', { text: t }))))
    for (const f of trace.features) {
      const row = el('tr', { class: 'trace-feature', 'data-layer': f.layer, 'data-feature': f.feature, 'data-max': f.max_act },
        el('td', {}, el('input', { type: 'checkbox', class: 'edit' })),
        el('td', {}, el('input', { class: 'scale', value: '0', size: 4 })),
        el('td', {}, el('a', { href: featureUrl('transcoder', f.layer, f.feature), text: `L${f.layer}/${f.feature}` })),
        el('td', { class: 'num', text: fmt(f.max_act, 4) }), el('td', { class: 'num', text: f.n_tokens }),
        el('td', { text: f.description || '' }))
      row.addEventListener('mouseenter', () => showFeature(f))
      table.append(row)
    }
    out.replaceChildren(el('p', { class: 'muted', text: `${trace.text.length} tokens; click a token for its features, hover a feature for its activations along the text.` }),
      tokens, perToken, el('h3', { text: 'Strongest features' }), table, interventionPanel(trace, params, table))
  }

  function interventionPanel(trace, params, table) {
    const adapters = el('span', {}, ...trace.layers.map(l => el('label', {}, el('input', { type: 'checkbox', class: 'adapter-off', value: l }), ` L${l} off `)))
    const maxNew = el('input', { id: 'steer-max-new', value: '20', size: 4 })
    const sample = el('input', { id: 'steer-sample', type: 'checkbox' })
    const seed = el('input', { id: 'steer-seed', value: '0', size: 4 })
    const track = el('input', { id: 'steer-track', placeholder: 'a token to follow' })
    const out = el('div', { id: 'steer-result' })
    const run = el('button', { id: 'steer-run', text: 'Run with interventions', onclick: async () => {
      const edits = [...table.querySelectorAll('tr.trace-feature')].filter(r => r.querySelector('.edit').checked)
        .map(r => `${r.dataset.layer}/${r.dataset.feature}=${r.querySelector('.scale').value || 0}`)
      for (const box of adapters.querySelectorAll('.adapter-off')) if (box.checked) edits.push(`${box.value}=off`)
      out.replaceChildren(el('p', { class: 'muted', text: 'running both ways…' }))
      const query = { ...params, edits: edits.join(','), max_new_tokens: maxNew.value, sample: sample.checked ? 1 : 0, seed: seed.value }
      if (track.value) query.track = track.value
      try { renderSteer(out, await api('steer', query)) } catch (error) { showError(out, error) }
    } })
    return el('section', { id: 'interventions' }, el('h3', { text: 'Interventions' }),
      el('p', { class: 'muted', text: 'Tick features above (scale 0 turns them off) or whole adapters, then compare.' }),
      el('div', {}, adapters), el('div', {}, 'new tokens ', maxNew, ' sample ', sample, ' seed ', seed, ' follow token ', track, ' ', run), out)
  }

  function renderSteer(out, result) {
    const tops = items => items.map(t => `${quote(t.token)} ${fmt(t.p_base, 2)}→${fmt(t.p_edited, 2)}`).join('  ')
    const rows = result.positions.map((p, i) => {
      const tracked = (p.tracked || [])[0]
      return el('tr', { class: 'steer-pos', 'data-pos': p.pos, 'data-kl': p.kl,
        'data-p-base': tracked ? tracked.p_base : null, 'data-p-edited': tracked ? tracked.p_edited : null },
        el('td', { class: 'num', text: p.pos }), el('td', { class: 'token', text: quote(result.text[i]) }),
        el('td', { class: 'num', text: fmt(p.kl, 3) }),
        el('td', { text: tracked ? `${fmt(tracked.p_base, 3)} → ${fmt(tracked.p_edited, 3)}` : '' }),
        el('td', { text: tops(p.base) }), el('td', { text: tops(p.edited) }))
    })
    const continuation = result.decoding.max_new_tokens > 0 ? el('div', { id: 'continuations' },
      el('h4', { text: `Continuation (${result.decoding.sample ? 'sampled, seed ' + result.decoding.seed : 'greedy'})` }),
      el('div', {}, el('b', { text: 'base: ' }), el('span', { class: 'ctx', id: 'continuation-base', text: result.continuation_base })),
      el('div', {}, el('b', { text: 'edited: ' }), el('span', { class: 'ctx', id: 'continuation-edited', text: result.continuation_edited }))) : null
    out.replaceChildren(el('p', { text: 'interventions: ' + result.edits.join(', ') }), continuation,
      el('h4', { text: 'Next-token distribution per position (probability base → edited)' }),
      el('table', { id: 'steer-table' }, el('tr', {}, ...['pos', 'token', 'KL', 'followed token', 'top base', 'top edited']
        .map(t => el('th', { text: t }))), ...rows))
  }

  // ---- routing ----

  function route() {
    document.getElementById('nav-trace').hidden = !config.model
    document.getElementById('nav-graphs').hidden = !config.graphs
    const path = location.pathname
    const feature = path.match(/^\/feature\/(transcoder|neuron)\/(\d+)\/(\d+)$/)
    const done = feature ? featureView(feature[1], +feature[2], +feature[3]) : path === '/trace' ? traceView() : listView()
    Promise.resolve(done).catch(error => showError(app, error))
  }
  window.addEventListener('popstate', route)
  route()
})()
