// charrnn playground: Generate (live text coloured by probability, alternatives on hover), Lesson (the
// predicted next character under each input one, and the hidden state as a heatmap), Neurons (the text
// shaded by one unit) and the Model card. Plain ES modules; everything it fetches is this server's API.
import { ApiError, completionStream, decodeFloats, describe, getJson, postJson } from './api.js';

const $ = (id) => document.querySelector(`[data-testid="${id}"]`);
const LESSON_MAX_CHARS = 256; // heatmap columns drawn; a trace may hold more
const ALTERNATIVES = 5; // OpenAI's limit on logprobs

const page = {
  info: null, // GET /v1/model
  controller: null, // the running Generate's AbortController
  generated: { prompt: '', text: '' },
  neurons: null, // { text, hidden: { shape, values } }
};

// ---- words on the page ---------------------------------------------------------------------------------
function showError(message) {
  const box = $('error');
  box.textContent = message;
  box.hidden = false;
}
function clearError() {
  $('error').hidden = true;
  $('error').textContent = '';
}
function status(message) {
  $('status').textContent = message;
}
function fail(error) {
  showError(describe(error));
}

// ---- colours ---------------------------------------------------------------------------------------------
function probabilityColour(p) { // red (unlikely) to green (likely)
  return `hsl(${Math.round(120 * Math.min(1, Math.max(0, p)))} 70% 84%)`;
}
function valueColour(v, strength = 1) { // blue (-1) through white (0) to red (+1); strength < 1: paler
  const t = Math.min(1, Math.abs(v)) * strength;
  const [r, g, b] = v < 0 ? [59, 110, 200] : [200, 60, 50];
  const mix = (c) => Math.round(255 + (c - 255) * t);
  return `rgb(${mix(r)} ${mix(g)} ${mix(b)})`;
}
function shown(c) { // a character as a person can read it
  return { '\n': '⏎', '\t': '⇥', ' ': '␣' }[c] ?? c;
}
const percent = (p) => `${(100 * p).toFixed(p < 0.001 ? 3 : 1)}%`;

// ---- the token and the model ----------------------------------------------------------------------------
const token = () => $('token').value.trim();

async function modelInfo() {
  if (!page.info) {
    page.info = await getJson('/v1/model', token());
    renderCard(page.info);
  }
  return page.info;
}

function renderCard(info) {
  const rows = [
    ['Model', info.id], ['Cell', info.cell], ['Layers', info.num_layers], ['Hidden units per layer', info.hidden_size],
    ['State per layer (floats)', info.state_size],
    ['Vocabulary', `${info.vocab.length} characters: ${info.vocab.map(shown).join(' ')}`],
    ['Validation loss (nats/char)', info.val_loss || 'not recorded'], ['Corpus', info.corpus || 'not recorded'],
    ['Training steps', info.steps || 'not recorded'], ['Exported', info.exported_at || 'not recorded'],
    ['PyTorch', info.torch_version || 'not recorded'], ['SHA-256', info.model_sha256],
    ['Hidden-state output', info.hidden ? 'yes' : 'no: export the model again to see the hidden state'],
    ['Runs on', info.execution_provider], ['Server version', info.project_version || 'unknown'],
    ['Max characters per Generate', info.max_chars],
  ];
  const card = $('model-card');
  card.replaceChildren();
  for (const [name, value] of rows) {
    const dt = document.createElement('dt');
    dt.textContent = name;
    const dd = document.createElement('dd');
    dd.textContent = String(value);
    card.append(dt, dd);
  }
}

// ---- views ----------------------------------------------------------------------------------------------
function showView(name) {
  for (const button of document.querySelectorAll('nav button')) {
    button.setAttribute('aria-pressed', String(button.dataset.view === name));
  }
  for (const section of document.querySelectorAll('[data-section]')) section.hidden = section.dataset.section !== name;
  hideAlternatives();
  if (location.hash !== `#${name}`) history.replaceState(null, '', `#${name}`);
}

// ---- Generate -------------------------------------------------------------------------------------------
function numberField(id, parse = Number) {
  const raw = $(id).value.trim();
  return raw === '' ? null : parse(raw);
}

function generateRequest(info) {
  const body = { model: info.id, prompt: $('prompt').value, logprobs: ALTERNATIVES };
  body.max_tokens = numberField('max-chars', (v) => Number.parseInt(v, 10)) ?? 300;
  body.temperature = numberField('temperature') ?? 1;
  const topK = numberField('top-k', (v) => Number.parseInt(v, 10)) ?? 0;
  if (topK > 0) body.top_k = topK;
  const topP = numberField('top-p') ?? 1;
  if (topP < 1) body.top_p = topP;
  const seed = numberField('seed', (v) => Number.parseInt(v, 10));
  if (seed !== null) body.seed = seed;
  return body;
}

function addChar(output, text, logprob, top) {
  const p = Math.exp(logprob);
  const span = document.createElement('span');
  span.className = 'char';
  span.dataset.testid = 'char';
  span.dataset.p = String(p);
  span.dataset.index = String(output.querySelectorAll('.char').length);
  span.tabIndex = 0;
  span.textContent = text;
  span.style.setProperty('background-color', probabilityColour(p));
  span.alternatives = Object.entries(top ?? {}).map(([c, lp]) => [c, Math.exp(lp)]).sort((a, b) => b[1] - a[1]);
  span.title = `${shown(text)}: ${percent(p)}`;
  output.append(span);
}

async function generate(event) {
  event.preventDefault();
  clearError();
  stopGenerating();
  const output = $('output');
  let info;
  try {
    info = await modelInfo();
  } catch (error) {
    fail(error);
    return;
  }
  const body = generateRequest(info);
  const controller = new AbortController();
  page.controller = controller;
  page.generated = { prompt: body.prompt, text: '' };
  const echo = document.createElement('span');
  echo.className = 'prompt-echo';
  echo.textContent = body.prompt;
  output.replaceChildren(echo);
  $('generate').disabled = true;
  $('stop').disabled = false;
  status('Generating…');
  let count = 0;
  try {
    for await (const chunk of completionStream(body, token(), controller.signal)) {
      const choice = chunk.choices[0];
      if (!choice?.logprobs) continue;
      const lp = choice.logprobs;
      for (let i = 0; i < lp.tokens.length; i += 1) {
        addChar(output, lp.tokens[i], lp.token_logprobs[i], lp.top_logprobs[i]);
        page.generated.text += lp.tokens[i];
        count += 1;
      }
      if (choice.finish_reason) status(`Done: ${count} characters (${choice.finish_reason === 'length' ? 'max chars reached' : 'stop'}).`);
    }
  } catch (error) {
    if (error.name === 'AbortError') status(`Stopped after ${count} characters.`);
    else {
      status('');
      fail(error);
    }
  } finally {
    if (page.controller === controller) page.controller = null;
    $('generate').disabled = false;
    $('stop').disabled = true;
  }
}

function stopGenerating() {
  if (page.controller) page.controller.abort();
  page.controller = null;
}

function showAlternatives(span) {
  const box = $('alternatives');
  const before = page.generated.prompt + page.generated.text.slice(0, Number(span.dataset.index));
  const head = document.createElement('div');
  head.className = 'head';
  head.textContent = `after “…${before.slice(-12).replace(/\n/g, '⏎')}” the model weighed:`;
  box.replaceChildren(head);
  const most = Math.max(...span.alternatives.map(([, p]) => p), 1e-9);
  for (const [c, p] of span.alternatives) {
    const row = document.createElement('div');
    row.className = `alternative${c === span.textContent ? ' chosen' : ''}`;
    row.dataset.testid = 'alternative';
    row.dataset.char = c;
    row.dataset.p = String(p);
    const name = document.createElement('span');
    name.className = 'c';
    name.textContent = shown(c);
    const bar = document.createElement('span');
    bar.className = 'bar';
    bar.style.setProperty('width', `${Math.max(2, (100 * p) / most)}%`); // relative to the likeliest
    const value = document.createElement('span');
    value.className = 'p';
    value.textContent = percent(p);
    row.append(name, bar, value);
    box.append(row);
  }
  const rect = span.getBoundingClientRect();
  box.hidden = false;
  const left = Math.min(rect.left + window.scrollX, window.scrollX + document.documentElement.clientWidth - box.offsetWidth - 8);
  box.style.setProperty('left', `${Math.max(4, left)}px`);
  box.style.setProperty('top', `${rect.bottom + window.scrollY + 4}px`);
  for (const other of document.querySelectorAll('.char.selected')) other.classList.remove('selected');
  span.classList.add('selected');
}

function hideAlternatives() {
  $('alternatives').hidden = true;
  for (const other of document.querySelectorAll('.char.selected')) other.classList.remove('selected');
}

// ---- the lesson: predictions under each character and the hidden state --------------------------------
async function trace(text) {
  const info = await modelInfo();
  if (!info.hidden) {
    throw new ApiError('This model file has no hidden-state output (it was exported before charrnn wrote one): '
      + 'export it again with `python -m export RUN_DIR` and restart the server to see the hidden state.');
  }
  if (!text) throw new ApiError('The text is empty: type one or more characters to trace.');
  const result = await postJson('/v1/trace', { text, top_k: ALTERNATIVES }, token());
  return { ...result, hidden: decodeFloats(result.hidden) };
}

// Per unit (layer * hidden_size + unit): values over the characters; their variance.
function unitSeries(hidden, chars) {
  const [, layers, size] = hidden.shape;
  const units = layers * size;
  const series = [];
  for (let k = 0; k < units; k += 1) {
    const values = new Float32Array(chars);
    for (let t = 0; t < chars; t += 1) values[t] = hidden.values[t * units + k];
    const mean = values.reduce((a, b) => a + b, 0) / chars;
    const variance = values.reduce((a, b) => a + (b - mean) ** 2, 0) / chars;
    series.push({ unit: k, layer: Math.floor(k / size), index: k % size, values, variance });
  }
  return series;
}

function cellOf(className, text) {
  const div = document.createElement('div');
  div.className = className;
  if (text !== undefined) div.textContent = text;
  return div;
}

function renderLesson(result) {
  const chars = Math.min(result.chars.length, LESSON_MAX_CHARS);
  const all = unitSeries(result.hidden, chars);
  const limit = Math.max(1, Number.parseInt($('heatmap-units').value, 10) || 48);
  // all units while they fit; else the ones that vary most, in their layer order
  const units = all.length <= limit ? all
    : [...all].sort((a, b) => b.variance - a.variance).slice(0, limit).sort((a, b) => a.unit - b.unit);
  const grid = cellOf('lesson-grid');
  grid.style.setProperty('grid-template-columns', `auto repeat(${chars}, minmax(2.2rem, auto))`);
  grid.append(cellOf('label', 'input'));
  for (let t = 0; t < chars; t += 1) grid.append(cellOf('in', shown(result.chars[t].input)));
  grid.append(cellOf('label', 'next'));
  for (let t = 0; t < chars; t += 1) {
    const c = result.chars[t];
    const next = cellOf('next');
    next.dataset.testid = 'next';
    next.dataset.p = String(c.probability);
    next.title = c.top.map((a) => `${shown(a.text)} ${percent(a.probability)}`).join(', ');
    const letter = document.createElement('span');
    letter.className = 'c';
    letter.textContent = c.next;
    const p = document.createElement('span');
    p.className = 'p';
    p.textContent = percent(c.probability);
    next.append(letter, p);
    next.style.setProperty('background-color', probabilityColour(c.probability));
    grid.append(next);
  }
  const heatmap = document.createElement('div');
  heatmap.dataset.testid = 'heatmap';
  heatmap.style.setProperty('display', 'contents');
  let layer = -1;
  for (const u of units) {
    const first = u.layer !== layer;
    layer = u.layer;
    const label = cellOf(`label${first ? ' layer-break' : ''}`, `L${u.layer} u${u.index}`);
    heatmap.append(label);
    for (let t = 0; t < chars; t += 1) {
      const v = u.values[t];
      const cell = cellOf(`cell${first ? ' layer-break' : ''}`);
      cell.dataset.testid = 'cell';
      cell.dataset.unit = String(u.unit);
      cell.dataset.layer = String(u.layer);
      cell.dataset.char = String(t);
      cell.dataset.value = String(v);
      cell.title = `layer ${u.layer} unit ${u.index} after '${shown(result.chars[t].input)}': ${v.toFixed(4)}`;
      cell.style.setProperty('background-color', valueColour(v));
      heatmap.append(cell);
    }
  }
  grid.append(heatmap);
  const notes = [];
  if (chars < result.chars.length) notes.push(`the first ${chars} of ${result.chars.length} characters`);
  if (units.length < all.length) notes.push(`the ${units.length} of ${all.length} units that vary most (raise "Units shown" for more)`);
  $('lesson').replaceChildren(grid);
  status(`Traced ${result.chars.length} characters: the model expects “${result.chars.map((c) => c.next).join('').slice(0, 60)}”`
    + (notes.length ? `; showing ${notes.join(' and ')}.` : '.'));
}

async function runLesson() {
  clearError();
  try {
    page.lesson = await trace($('prompt').value);
    renderLesson(page.lesson);
  } catch (error) {
    fail(error);
  }
}

// ---- neurons: the whole text shaded by one unit ---------------------------------------------------------
function neuronText() {
  const prompt = $('prompt').value;
  return page.generated.prompt === prompt ? prompt + page.generated.text : prompt;
}

function fillUnits(series, score, label) {
  const select = $('units');
  select.replaceChildren();
  for (const u of [...series].sort((a, b) => score(b) - score(a))) {
    const option = document.createElement('option');
    option.value = String(u.unit);
    option.textContent = `L${u.layer} u${u.index}  ${label(u)}`;
    select.append(option);
  }
  select.selectedIndex = 0;
  shade();
}

async function runNeurons() {
  clearError();
  try {
    const info = await modelInfo();
    let text = neuronText();
    if (text.length > info.max_trace_chars) text = text.slice(-info.max_trace_chars);
    const result = await trace(text);
    page.neurons = { text, chars: result.chars, series: unitSeries(result.hidden, result.chars.length) };
    const box = $('activations');
    box.replaceChildren();
    for (let t = 0; t < text.length; t += 1) {
      const span = document.createElement('span');
      span.className = 'activation';
      span.dataset.testid = 'activation';
      span.dataset.index = String(t);
      span.textContent = text[t];
      box.append(span);
    }
    fillUnits(page.neurons.series, (u) => u.variance, (u) => `σ ${Math.sqrt(u.variance).toFixed(3)}`);
    status(`Traced ${text.length} characters; units sorted by how much they vary over the text.`);
  } catch (error) {
    fail(error);
  }
}

function shade() {
  const n = page.neurons;
  const unit = Number($('units').value);
  if (!n || Number.isNaN(unit)) return;
  const values = n.series[unit].values;
  for (const span of $('activations').children) {
    const v = values[Number(span.dataset.index)];
    span.dataset.value = String(v);
    span.title = `after '${shown(span.textContent)}': ${v.toFixed(4)}`;
    span.style.setProperty('background-color', valueColour(v, 0.65)); // pale enough to read the text
  }
}

function unitsInSelection() {
  clearError();
  const n = page.neurons;
  const selection = window.getSelection();
  if (!n || !selection || selection.rangeCount === 0 || selection.isCollapsed) {
    showError('Select a span of the shaded text first (trace it with the button above), then ask again.');
    return;
  }
  const range = selection.getRangeAt(0);
  const inside = [...$('activations').children].filter((span) => range.intersectsNode(span))
    .map((span) => Number(span.dataset.index));
  if (!inside.length || inside.length === n.text.length) {
    showError('Select part of the shaded text (not all of it), then ask again.');
    return;
  }
  const chosen = new Set(inside);
  const contrast = (u) => {
    let a = 0; let b = 0;
    u.values.forEach((v, t) => { if (chosen.has(t)) a += v; else b += v; });
    return a / chosen.size - b / (u.values.length - chosen.size);
  };
  for (const u of n.series) u.contrast = contrast(u);
  fillUnits(n.series, (u) => Math.abs(u.contrast), (u) => `Δ ${u.contrast >= 0 ? '+' : ''}${u.contrast.toFixed(3)}`);
  status(`Units sorted by how differently they fire inside the ${inside.length} selected characters.`);
}

// ---- wiring ---------------------------------------------------------------------------------------------
function start() {
  $('token').value = sessionStorage.getItem('charrnn-token') ?? '';
  $('token').addEventListener('change', () => {
    sessionStorage.setItem('charrnn-token', token());
    page.info = null;
    clearError();
    modelInfo().catch(fail);
  });
  for (const button of document.querySelectorAll('nav button')) {
    button.addEventListener('click', () => showView(button.dataset.view));
  }
  document.getElementById('generate-form').addEventListener('submit', generate);
  $('stop').addEventListener('click', () => {
    stopGenerating();
    $('stop').disabled = true;
  });
  const output = $('output');
  output.addEventListener('mouseover', (e) => { if (e.target.classList?.contains('char')) showAlternatives(e.target); });
  output.addEventListener('focusin', (e) => { if (e.target.classList?.contains('char')) showAlternatives(e.target); });
  output.addEventListener('click', (e) => { if (e.target.classList?.contains('char')) showAlternatives(e.target); });
  output.addEventListener('mouseleave', hideAlternatives);
  document.addEventListener('keydown', (e) => { if (e.key === 'Escape') hideAlternatives(); });
  $('trace').addEventListener('click', runLesson);
  $('heatmap-units').addEventListener('change', () => { if (page.lesson) renderLesson(page.lesson); });
  $('neurons-trace').addEventListener('click', runNeurons);
  $('units').addEventListener('change', shade);
  $('units-in-selection').addEventListener('click', unitsInSelection);
  const view = location.hash.slice(1);
  showView(['generate', 'lesson', 'neurons', 'model'].includes(view) ? view : 'generate');
  modelInfo().catch(fail);
}

start();
