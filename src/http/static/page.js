// streamiq labelling page: plain JS, no dependencies, talks to /api/v1 only.
// Shows each stream's recent scored frames, lets the operator rate the selected one
// (keys 1-5 or the buttons) and POSTs {frame_id, mos} to /api/v1/labels with the
// bearer token, which the operator enters once per tab: it is kept in sessionStorage
// (gone with the tab) and sent as a header; POST /api/v1/session turns it into an
// HttpOnly cookie so that thumbnails load without the token in their URLs.
// Refreshes every 5 s and keeps the selection. Frames kept with incidents (black,
// freeze, colour bars, quality drops, each stream's lowest score: /api/v1/incidents)
// follow the streams, shown at the source's resolution, and are rated the same way.
'use strict';

const TOKEN_KEY = 'streamiq.apiToken';
const PREFS_KEY = 'streamiq.labelPage';
const REFRESH_MS = 5000;
const MOS_NAMES = { 1: 'Bad', 2: 'Poor', 3: 'Fair', 4: 'Good', 5: 'Excellent' };
const ORDER_HELP = {
  informative:
    'Most informative first: frames the model is unsure about (score near 0.5) or that ' +
    'disagree with what was labelled lately on the same stream come first. Rank = ' +
    'max(1 − 2·|score − 0.5|, 2·|score − t̄|), where t̄ is the mean target (MOS 1…5 mapped ' +
    'to 0…1) of the stream’s last 20 labels for the active model. Rated and skipped ' +
    'frames go last; ties newest first.',
  newest: 'Newest first, as the stream produced them.',
};

const $ = (id) => document.getElementById(id);
const INCIDENTS = { id: 'incidents', virtual: true };
const INCIDENT_KINDS = {
  black: 'black picture',
  freeze: 'frozen picture',
  bars: 'colour bars',
  quality_low: 'quality drop',
  lowest: 'lowest score of the period',
};
const MAX_INCIDENTS = 12;

const state = {
  streams: [], // GET /api/v1/streams
  raw: [], // per stream (same order): frames as fetched, newest first
  incidents: [], // GET /api/v1/incidents, newest first
  frames: new Map(), // stream id -> frames in display order
  byId: new Map(), // frame id -> frame (with .stream and .info)
  summary: null, // GET /api/v1/labels/summary, or null
  rated: new Map(), // frame id -> what was given ("4", or "✓" for a score label)
  skipped: new Set(),
  selected: null, // frame id
  order: 'informative',
  limit: 24,
  posting: false,
  loaded: false, // the first refresh succeeded
  tokenAsked: false, // the operator was asked for the token since it last changed
};
const sections = new Map(); // stream id -> <section>
const items = new Map(); // frame id -> <li>

// ---- storage (may be unavailable, e.g. disabled cookies) ----
// Preferences live in localStorage; the token only in this tab's sessionStorage.

function store(kind) {
  try {
    return kind === 'session' ? window.sessionStorage : window.localStorage;
  } catch (_) {
    return null;
  }
}

function load(key, kind) {
  try {
    const s = store(kind);
    return s ? s.getItem(key) : null;
  } catch (_) {
    return null;
  }
}

function save(key, value, kind) {
  try {
    const s = store(kind);
    if (!s) return false;
    if (value === null) s.removeItem(key);
    else s.setItem(key, value);
    return true;
  } catch (_) {
    return false;
  }
}

function token() {
  return (load(TOKEN_KEY, 'session') || '').trim();
}

function authHeaders() {
  const t = token();
  return t ? { Authorization: 'Bearer ' + t } : {};
}

// ---- messages ----

function showMessage(kind, text) {
  const m = $('message');
  m.className = 'message ' + kind;
  m.textContent = text;
  m.hidden = false;
}

function clearMessage(kind) {
  const m = $('message');
  if (!kind || m.classList.contains(kind)) m.hidden = true;
}

function apiErrorText(status, body) {
  if (body && typeof body.error === 'string') {
    const field = body.field ? ` (field: ${body.field})` : '';
    return `${status}: ${body.error}${field}`;
  }
  return `HTTP ${status}`;
}

/** Points the operator at the token field; `lead` says what went wrong. */
function askForToken(lead) {
  const input = $('token');
  input.classList.add('attention');
  showMessage(
    'error',
    `${lead} Enter the token from the file named by server.api_token_file in the ` +
      'daemon’s config (the daemon logs that path when it starts) into the API token ' +
      'field above.',
  );
  input.focus();
}

// ---- data ----

async function getJson(path) {
  const res = await fetch(path, {
    headers: { Accept: 'application/json', ...authHeaders() },
    cache: 'no-store',
  });
  const body = await res.json().catch(() => null);
  if (!res.ok) {
    const err = new Error(apiErrorText(res.status, body));
    err.status = res.status;
    throw err;
  }
  return body;
}

/** Turns the token into the session cookie the thumbnails need. */
async function openSession(value) {
  const res = await fetch('/api/v1/session', {
    method: 'POST',
    headers: { Authorization: 'Bearer ' + value },
    cache: 'no-store',
  });
  if (res.status === 204) return { ok: true };
  const body = await res.json().catch(() => null);
  return { ok: false, text: apiErrorText(res.status, body) };
}

function streamSummary(id) {
  const s = state.summary && state.summary.streams;
  return (s && s[id]) || null;
}

/** Mean target of the stream's recent labels for the active model, or null. */
function recentMean(id) {
  const s = streamSummary(id);
  const t = s && s.recent_targets;
  if (!t || t.length === 0) return null;
  return t.reduce((a, b) => a + b, 0) / t.length;
}

/** How much a label of this frame would teach the model, in [0, 1]. */
function informativeness(score, mean) {
  const uncertainty = 1 - 2 * Math.abs(score - 0.5);
  const surprise = mean === null ? 0 : Math.min(1, 2 * Math.abs(score - mean));
  return Math.max(uncertainty, surprise);
}

function done(f) {
  return state.rated.has(f.id) || state.skipped.has(f.id);
}

function byInformativeness(a, b) {
  return done(a) - done(b) || b.info - a.info || b.id - a.id;
}

/** Rebuilds the display order from the last fetch; keeps the selected frame. */
/** The streams, then the incidents' section when there are incident frames. */
function sectionsShown() {
  return incidentFrames().length > 0 ? [...state.streams, INCIDENTS] : state.streams;
}

/** Labellable incident frames as page frames (ids are strings, never frame numbers). */
function incidentFrames() {
  const out = [];
  for (const inc of state.incidents.slice(0, MAX_INCIDENTS)) {
    for (const f of inc.frames) {
      if (!f.labellable) continue;
      out.push({
        id: `incident:${inc.id}:${f.n}`,
        incident: inc.id,
        n: f.n,
        kind: inc.kind,
        onset: f.onset,
        width: f.width,
        height: f.height,
        stream: inc.stream,
        score: f.score,
        time: inc.at,
        thumbnail: f.url,
        native: f.url,
        prompt_version: null,
      });
    }
  }
  return out;
}

function arrange() {
  const previous = state.byId;
  const keep = previous.get(state.selected);
  state.frames = new Map();
  state.byId = new Map();
  sectionsShown().forEach((s, i) => {
    const frames = s.virtual
      ? incidentFrames()
      : (state.raw[i] || []).map((f) => ({ ...f, stream: s.id }));
    if (keep && !s.virtual && !keep.incident && keep.stream === s.id && !frames.some((f) => f.id === keep.id)) {
      frames.push({ ...keep, aged: true });
    }
    const mean = recentMean(s.id);
    for (const f of frames) f.info = informativeness(f.score, mean);
    if (state.order === 'informative') frames.sort(byInformativeness);
    state.frames.set(s.id, frames);
    for (const f of frames) state.byId.set(f.id, f);
  });
  if (!state.byId.has(state.selected)) {
    const all = flat();
    const open = all.find((f) => !done(f));
    state.selected = open ? open.id : all.length ? all[0].id : null;
  }
}

function flat() {
  const out = [];
  for (const s of sectionsShown()) out.push(...(state.frames.get(s.id) || []));
  return out;
}

function absorbSummary(summary) {
  state.summary = summary;
  if (!summary || !summary.streams) return;
  for (const s of Object.values(summary.streams)) {
    for (const l of s.labelled_frames || []) {
      if (!state.rated.has(l.frame_id)) {
        state.rated.set(l.frame_id, l.mos != null ? String(l.mos) : '✓');
      }
    }
  }
}

/** After a label: new counts and targets, so the ranking and the marks follow. */
async function refreshSummary() {
  try {
    absorbSummary(await getJson('/api/v1/labels/summary'));
  } catch (_) {
    state.summary = null;
  }
  arrange();
  render();
}

let timer = null;

async function refresh() {
  clearTimeout(timer);
  try {
    let refused = false;
    const refusal = (e) => {
      if (e.status === 401) refused = true;
      return null;
    };
    const [streams, summary, incidents] = await Promise.all([
      getJson('/api/v1/streams'),
      getJson('/api/v1/labels/summary').catch(refusal),
      getJson('/api/v1/incidents').catch(refusal),
    ]);
    const lists = await Promise.all(
      streams.map((s) =>
        getJson(`/api/v1/streams/${encodeURIComponent(s.id)}/frames?limit=${state.limit}`).catch(
          (e) => refusal(e) || [],
        ),
      ),
    );
    // Frames and labels need the token: say so once, not at every refresh.
    if (refused && !state.tokenAsked) {
      state.tokenAsked = true;
      askForToken(
        token()
          ? 'The daemon refused the API token, so no frames are shown.'
          : 'Frames and labels need the API token.',
      );
    }
    state.streams = streams;
    state.raw = lists;
    state.incidents = (incidents && incidents.incidents) || [];
    state.loaded = true;
    absorbSummary(summary);
    arrange();
    render();
    $('refreshed').textContent = 'updated ' + new Date().toLocaleTimeString();
    clearMessage('offline');
  } catch (e) {
    showMessage('error offline', `Cannot read the streams (${e.message}); retrying every 5 s.`);
  } finally {
    timer = setTimeout(refresh, REFRESH_MS);
  }
}

// ---- actions ----

function focusSelected() {
  const li = items.get(state.selected);
  if (li) {
    const b = li.firstElementChild;
    b.focus({ preventScroll: true });
    b.scrollIntoView({ block: 'nearest' });
  }
}

function select(id, focus) {
  if (id === null || id === undefined) return;
  state.selected = id;
  render();
  if (focus) focusSelected();
}

function move(delta) {
  const all = flat();
  if (all.length === 0) return;
  const i = all.findIndex((f) => f.id === state.selected);
  const j = i < 0 ? 0 : Math.min(all.length - 1, Math.max(0, i + delta));
  select(all[j].id, true);
}

/** Selects the first frame after `id` (wrapping) that is neither rated nor skipped. */
function selectNextOpen(id) {
  const all = flat();
  const i = all.findIndex((f) => f.id === id);
  for (let k = 1; k <= all.length; k++) {
    const f = all[(i + k) % all.length];
    if (!done(f)) return select(f.id, true);
  }
  move(1);
}

function skip() {
  if (state.selected === null) return;
  state.skipped.add(state.selected);
  selectNextOpen(state.selected);
}

async function rate(mos) {
  const f = state.byId.get(state.selected);
  if (!f || state.posting) return;
  const t = token();
  if (!t) {
    askForToken('No API token entered yet.');
    return;
  }
  state.posting = true;
  renderPanel();
  try {
    const res = await fetch('/api/v1/labels', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Authorization: 'Bearer ' + t },
      body: JSON.stringify(
        f.incident ? { incident: f.incident, frame: f.n, mos } : { frame_id: f.id, mos },
      ),
    });
    const body = await res.json().catch(() => null);
    if (res.status === 401) {
      askForToken(`The daemon refused the API token — ${apiErrorText(res.status, body)}.`);
      return;
    }
    if (!res.ok) {
      const gone =
        res.status === 404 && body && ['frame_id', 'incident', 'frame'].includes(body.field);
      if (gone) state.skipped.add(f.id);
      showMessage(
        'error',
        `Frame ${f.id} was not labelled: ${apiErrorText(res.status, body)}` +
          (gone ? '. It is no longer kept; moved on.' : ''),
      );
      if (gone) selectNextOpen(f.id);
      return;
    }
    $('token').classList.remove('attention');
    state.rated.set(f.id, String(mos));
    state.skipped.delete(f.id);
    const what = f.incident
      ? `Incident frame ${f.n} (${f.stream}, ${INCIDENT_KINDS[f.kind] || f.kind})`
      : `Frame ${f.id} (${f.stream})`;
    showMessage(
      'ok',
      `${what} rated ${mos} – ${MOS_NAMES[mos]}` +
        (body && body.replaced ? ', replacing your earlier rating.' : '.'),
    );
    selectNextOpen(f.id);
    refreshSummary();
  } catch (e) {
    showMessage('error', `Frame ${f.id} was not labelled: ${e.message}`);
  } finally {
    state.posting = false;
    renderPanel();
  }
}

// ---- rendering ----

function fmt(x, digits) {
  return typeof x === 'number' && isFinite(x) ? x.toFixed(digits) : '–';
}

function thumbUrl(f) {
  if (f.incident) return f.thumbnail;
  // Frame ids restart with every daemon run: the run id keeps cached thumbnails apart.
  const run = state.summary && state.summary.run_id;
  return run ? `${f.thumbnail}?run=${encodeURIComponent(run)}` : f.thumbnail;
}

function frameStatus(f) {
  if (state.rated.has(f.id)) return `rated ${state.rated.get(f.id)}`;
  if (state.skipped.has(f.id)) return 'skipped';
  return 'not rated';
}

function frameItem(f) {
  let li = items.get(f.id);
  if (!li) {
    li = document.createElement('li');
    const b = document.createElement('button');
    b.type = 'button';
    b.className = 'frame';
    b.dataset.id = String(f.id);
    if (f.incident) b.dataset.incident = f.incident;
    b.addEventListener('click', () => select(f.id, true));
    const img = document.createElement('img');
    img.alt = '';
    img.width = 112;
    img.height = 112;
    img.src = thumbUrl(f);
    const badge = document.createElement('span');
    badge.className = 'badge';
    const cap = document.createElement('span');
    cap.className = 'cap';
    const score = document.createElement('span');
    score.className = 'score';
    const info = document.createElement('span');
    info.className = 'info';
    cap.append(score, info);
    b.append(img, badge, cap);
    li.append(b);
    items.set(f.id, li);
  }
  const b = li.firstElementChild;
  const selected = f.id === state.selected;
  const rated = state.rated.get(f.id);
  b.setAttribute('aria-current', selected ? 'true' : 'false');
  b.tabIndex = selected ? 0 : -1;
  b.classList.toggle('rated', rated !== undefined);
  b.classList.toggle('skipped', rated === undefined && state.skipped.has(f.id));
  b.querySelector('.badge').textContent =
    rated !== undefined ? `★ ${rated}` : state.skipped.has(f.id) ? 'skipped' : '';
  b.querySelector('.score').textContent = fmt(f.score, 2);
  const info = b.querySelector('.info');
  info.textContent = `info ${fmt(f.info, 2)}`;
  info.title = ORDER_HELP.informative;
  b.setAttribute(
    'aria-label',
    f.incident
      ? `${INCIDENT_KINDS[f.kind] || f.kind} on ${f.stream}, frame ${f.n}, score ${fmt(f.score, 2)}, ${frameStatus(f)}`
      : `Frame ${f.id} of ${f.stream}, score ${fmt(f.score, 2)}, ${frameStatus(f)}`,
  );
  return li;
}

function streamSection(s) {
  let sec = sections.get(s.id);
  if (!sec) {
    sec = document.createElement('section');
    sec.className = 'stream';
    const h = document.createElement('h2');
    const name = document.createElement('span');
    const facts = document.createElement('span');
    facts.className = 'facts';
    h.append(name, facts);
    const ol = document.createElement('ol');
    ol.className = 'frames';
    const empty = document.createElement('p');
    empty.className = 'muted';
    sec.append(h, ol, empty);
    sections.set(s.id, sec);
  }
  const [name, facts] = sec.querySelector('h2').children;
  if (s.virtual) {
    name.textContent = 'Incidents';
    facts.textContent =
      'frames kept around black, frozen, colour-bars and low-quality moments, ' +
      'at the source’s resolution';
    sec.setAttribute('aria-label', 'Incident frames');
    return sec;
  }
  name.textContent = s.id;
  const mean = recentMean(s.id);
  const sum = streamSummary(s.id);
  const labels = sum ? sum.labels : 0;
  facts.textContent = [
    s.up ? 'up' : s.phase,
    `quality ${fmt(s.quality, 2)}`,
    `${fmt(s.fps, 1)} fps`,
    mean === null
      ? 'no labels yet'
      : `${labels} label${labels === 1 ? '' : 's'}, recent t̄ ${fmt(mean, 2)}`,
  ].join(' · ');
  sec.setAttribute('aria-label', `Stream ${s.id}`);
  return sec;
}

function renderStreams() {
  const root = $('streams');
  const hadFocus = document.activeElement && document.activeElement.classList.contains('frame');
  const wanted = new Set();
  const keepSections = new Set();
  sectionsShown().forEach((s, i) => {
    const sec = streamSection(s);
    keepSections.add(sec);
    if (root.children[i] !== sec) root.insertBefore(sec, root.children[i] || null);
    const ol = sec.querySelector('ol');
    const frames = state.frames.get(s.id) || [];
    frames.forEach((f, k) => {
      wanted.add(f.id);
      const li = frameItem(f);
      if (ol.children[k] !== li) ol.insertBefore(li, ol.children[k] || null);
    });
    while (ol.children.length > frames.length) ol.lastElementChild.remove();
    sec.querySelector('p').textContent =
      frames.length === 0 ? `No scored frames yet (${s.phase}).` : '';
  });
  for (const child of [...root.children]) if (!keepSections.has(child)) child.remove();
  for (const id of [...items.keys()]) if (!wanted.has(id)) items.delete(id);
  if (state.loaded && state.streams.length === 0) root.textContent = 'No streams configured.';
  if (hadFocus && document.activeElement !== items.get(state.selected)?.firstElementChild) {
    const li = items.get(state.selected);
    if (li) li.firstElementChild.focus({ preventScroll: true });
  }
}

function detail(dl, term, value) {
  const dt = document.createElement('dt');
  dt.textContent = term;
  const dd = document.createElement('dd');
  dd.textContent = value;
  dl.append(dt, dd);
}

function renderPanel() {
  const f = state.byId.get(state.selected);
  const img = $('sel-img');
  const dl = $('sel-details');
  dl.textContent = '';
  for (const b of document.querySelectorAll('#rate button')) {
    b.disabled = !f || state.posting;
    b.classList.toggle('chosen', !!f && state.rated.get(f.id) === b.dataset.mos);
    b.title = `Rate ${b.dataset.mos} – ${MOS_NAMES[b.dataset.mos]} (key ${b.dataset.mos})`;
  }
  for (const id of ['prev', 'skip', 'next']) $(id).disabled = !f;
  if (!f) {
    $('sel-full').hidden = true;
    img.classList.remove('native');
    img.removeAttribute('src');
    img.alt = 'No frame selected';
    $('sel-caption').textContent = 'No frame to label yet.';
    return;
  }
  const url = thumbUrl(f);
  if (img.getAttribute('src') !== url) img.src = url;
  img.classList.toggle('native', !!f.incident);
  const full = $('sel-full');
  full.hidden = !f.incident;
  if (f.incident) {
    full.href = f.native;
    img.alt = `${INCIDENT_KINDS[f.kind] || f.kind} on ${f.stream}: frame ${f.n} at ${f.width}×${f.height}`;
    $('sel-caption').textContent =
      `${f.stream} · ${INCIDENT_KINDS[f.kind] || f.kind}${f.onset ? ' (the moment it began)' : ''}`;
    detail(dl, 'Captured', new Date(f.time * 1000).toLocaleString());
    detail(dl, 'Size', `${f.width}×${f.height}, as the source sent it`);
    detail(dl, 'Model score', fmt(f.score, 3));
    detail(dl, 'Status', frameStatus(f));
    return;
  }
  img.alt = `Frame ${f.id} of stream ${f.stream}, as the model saw it`;
  $('sel-caption').textContent = `${f.stream} · frame ${f.id}`;
  detail(dl, 'Captured', new Date(f.time * 1000).toLocaleTimeString());
  detail(dl, 'Model score', fmt(f.score, 3));
  detail(dl, 'Informativeness', fmt(f.info, 2));
  detail(dl, 'Prompt set', `v${f.prompt_version}`);
  detail(dl, 'Status', frameStatus(f) + (f.aged ? ' (older than the frames shown)' : ''));
}

function renderProgress() {
  const s = state.summary;
  const bar = $('progress-bar');
  const text = $('progress-text');
  if (!s) {
    bar.value = 0;
    text.textContent = 'label counts unavailable';
    return;
  }
  bar.max = Math.max(1, s.min_labels);
  bar.value = Math.min(s.labels_for_model, bar.max);
  text.textContent =
    s.needed > 0
      ? `${s.labels_for_model} of ${s.min_labels} labels: ${s.needed} more needed`
      : `${s.labels_for_model} labels: enough (adapt.min_labels = ${s.min_labels})`;
  const sha = (s.model_sha256 || '').slice(0, 12);
  bar.title = text.title =
    `Labels stored for the active encoder (visual.onnx sha256 ${sha}…); ` +
    'streamiq-adapt needs adapt.min_labels of them before it adapts the prompts.';
}

function render() {
  renderStreams();
  renderPanel();
  renderProgress();
}

// ---- wiring ----

function onKey(e) {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const t = e.target;
  if (t && ['INPUT', 'SELECT', 'TEXTAREA'].includes(t.tagName)) return;
  switch (e.key) {
    case '1':
    case '2':
    case '3':
    case '4':
    case '5':
      rate(Number(e.key));
      break;
    case 'ArrowRight':
    case 'ArrowDown':
    case 'j':
      move(1);
      break;
    case 'ArrowLeft':
    case 'ArrowUp':
    case 'k':
      move(-1);
      break;
    case 's':
      skip();
      break;
    default:
      return;
  }
  e.preventDefault();
}

function showTokenState() {
  $('token-state').textContent = token() ? 'saved' : 'not set';
  $('token-state').title = token() ? 'kept in this tab only (sessionStorage)' : '';
}

async function submitToken(e) {
  e.preventDefault();
  const value = $('token').value.trim();
  $('token').classList.remove('attention');
  $('token').blur();
  state.tokenAsked = false;
  if (!value) {
    save(TOKEN_KEY, null, 'session');
    await fetch('/api/v1/session', { method: 'DELETE' }).catch(() => null);
    showTokenState();
    showMessage('ok', 'Token removed from this tab.');
    refresh();
    return;
  }
  const session = await openSession(value).catch((err) => ({ ok: false, text: err.message }));
  if (!session.ok) {
    save(TOKEN_KEY, null, 'session');
    showTokenState();
    state.tokenAsked = true;
    askForToken(`The daemon refused the API token — ${session.text}.`);
    return;
  }
  const stored = save(TOKEN_KEY, value, 'session');
  showTokenState();
  showMessage(
    stored ? 'ok' : 'error',
    stored
      ? 'Token accepted for this tab. Rate the selected frame with keys 1–5.'
      : 'This browser does not allow sessionStorage; the token cannot be kept.',
  );
  refresh();
  focusSelected();
}

function init() {
  try {
    const prefs = JSON.parse(load(PREFS_KEY, 'local') || '{}');
    if (prefs.order in ORDER_HELP) state.order = prefs.order;
    if ([12, 24, 48].includes(prefs.limit)) state.limit = prefs.limit;
  } catch (_) {
    // Unreadable preferences: the defaults.
  }
  const savePrefs = () =>
    save(PREFS_KEY, JSON.stringify({ order: state.order, limit: state.limit }), 'local');
  $('order').value = state.order;
  $('limit').value = String(state.limit);
  $('order-help').textContent = ORDER_HELP[state.order];
  $('order').title = ORDER_HELP.informative;
  $('order').addEventListener('change', (e) => {
    state.order = e.target.value;
    $('order-help').textContent = ORDER_HELP[state.order];
    savePrefs();
    arrange();
    render();
  });
  $('limit').addEventListener('change', (e) => {
    state.limit = Number(e.target.value);
    savePrefs();
    refresh();
  });
  $('token').value = token();
  showTokenState();
  $('token-form').addEventListener('submit', submitToken);
  for (const b of document.querySelectorAll('#rate button')) {
    b.addEventListener('click', () => rate(Number(b.dataset.mos)));
  }
  $('prev').addEventListener('click', () => move(-1));
  $('next').addEventListener('click', () => move(1));
  $('skip').addEventListener('click', skip);
  document.addEventListener('keydown', onKey);
  render();
  // A token kept from earlier in this tab: renew its cookie before the first refresh.
  const kept = token();
  if (kept) openSession(kept).catch(() => null).finally(refresh);
  else refresh();
}

init();
