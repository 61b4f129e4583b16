-- Headless end-to-end test: real Neovim, the real server, the real default model.
-- Env: PROMPT_SALIENCE_BIN (the binary), PLUGIN_DIR (editors/nvim), TEST_FILE (a writable path).
local passed, failed = 0, 0
local function check(name, cond, detail)
  if cond then
    passed = passed + 1
    io.stderr:write('ok   ' .. name .. '\n')
  else
    failed = failed + 1
    io.stderr:write('FAIL ' .. name .. (detail and (': ' .. vim.inspect(detail)) or '') .. '\n')
  end
end

local function marks(buf, ns)
  return vim.api.nvim_buf_get_extmarks(buf, ns, 0, -1, { details = true })
end

local ok, err = xpcall(function()
  vim.opt.rtp:prepend(os.getenv('PLUGIN_DIR'))
  vim.cmd('filetype on')
  vim.cmd('runtime plugin/prompt_salience.lua')
  local ps = require('prompt_salience')
  ps.setup({ cmd = { os.getenv('PROMPT_SALIENCE_BIN'), 'lsp' } })
  local file = os.getenv('TEST_FILE')
  vim.fn.writefile({
    '---',
    'salience:',
    '  max_new_tokens: 8',
    '  method: grad_dot_input', -- signed maps; the granularity is the default, sentence
    '---',
    'You are a careful assistant. Answer in one word.',
    '',
    'What colour is the sky on a clear day?',
  }, file)
  vim.cmd('edit ' .. file)
  local buf = vim.api.nvim_get_current_buf()
  check('filetype is promptmd', vim.bo.filetype == 'promptmd', vim.bo.filetype)
  local client
  vim.wait(20000, function()
    client = vim.lsp.get_clients({ bufnr = buf, name = 'prompt_salience' })[1]
    return client ~= nil and client.initialized
  end, 50)
  check('server attached', client ~= nil)

  vim.cmd('SalienceCompute')
  vim.wait(180000, function()
    return #marks(buf, ps.namespace) > 0
  end, 100)
  local m = marks(buf, ps.namespace)
  local groups, target = {}, nil
  for _, x in ipairs(m) do
    if x[4].hl_group == 'PromptSalienceTarget' then
      target = x
    else
      table.insert(groups, x[4].hl_group)
    end
  end
  check('three sentences painted', #groups == 3, groups)
  local valid = true
  for _, g in ipairs(groups) do
    valid = valid and (g:match('^PromptSalience[PN][oe][sg][1-8]$') ~= nil)
  end
  check('signed level groups', valid and #groups > 0, groups)
  check('some sentence at full level', vim.tbl_contains(groups, 'PromptSaliencePos8') or vim.tbl_contains(groups, 'PromptSalienceNeg8'), groups)
  local state = vim.b[buf].prompt_salience or {}
  check('generated response reported, no target mark outside the file', target == nil and type(state.generated) == 'string' and #state.generated > 0, state)

  -- Hover on the first sentence.
  local params = { textDocument = { uri = vim.uri_from_bufnr(buf) }, position = { line = 5, character = 4 } }
  local res = client:request_sync('textDocument/hover', params, 10000, buf)
  local text = res and res.result and res.result.contents and res.result.contents.value or ''
  check('hover shows rank and share', text:find('of 3 sentences', 1, true) ~= nil and text:find('% of the total', 1, true) ~= nil, text)

  -- Semantic tokens arrive as extmarks with level groups.
  vim.wait(5000, function()
    for name, id in pairs(vim.api.nvim_get_namespaces()) do
      if name:find('semantic_tokens') and #vim.api.nvim_buf_get_extmarks(buf, id, 0, -1, {}) > 0 then
        return true
      end
    end
    return false
  end, 50)
  local st_groups = {}
  for name, id in pairs(vim.api.nvim_get_namespaces()) do
    if name:find('semantic_tokens') then
      for _, x in ipairs(vim.api.nvim_buf_get_extmarks(buf, id, 0, -1, { details = true })) do
        table.insert(st_groups, x[4].hl_group)
      end
    end
  end
  check('semantic token level highlights', vim.iter(st_groups):any(function(g)
    return g:match('^@lsp%.mod%.level%d%.promptmd$') ~= nil
  end), st_groups)

  -- Granularity switch: words, from cached scores.
  vim.cmd('SalienceGranularity word')
  vim.wait(10000, function()
    return #marks(buf, ps.namespace) > 10
  end, 50)
  check('granularity switch to words', #marks(buf, ps.namespace) > 10, #marks(buf, ps.namespace))

  -- A visual selection inside the prompt is the target: "Answer in one word."
  vim.api.nvim_buf_set_mark(buf, '<', 6, 29, {})
  vim.api.nvim_buf_set_mark(buf, '>', 6, 47, {})
  vim.cmd("'<,'>SalienceCompute")
  local tmark
  vim.wait(120000, function()
    for _, x in ipairs(marks(buf, ps.namespace)) do
      if x[4].hl_group == 'PromptSalienceTarget' and x[2] == 5 then
        tmark = x
        return true
      end
    end
    return false
  end, 100)
  check('visual range is the target', tmark ~= nil and tmark[3] == 29 and tmark[4].end_col == 48, tmark)
  local before = 0
  for _, x in ipairs(marks(buf, ps.namespace)) do
    if x[4].hl_group ~= 'PromptSalienceTarget' then
      before = before + 1
    end
  end
  check('only text before the target is scored', before == 1, before)

  -- Messages the plugin echoes (generated response, faithfulness verdict).
  local messages = {}
  local notify = vim.notify
  vim.notify = function(msg, level, o)
    table.insert(messages, msg)
    return notify(msg, level, o)
  end
  local function state()
    return vim.b[buf].prompt_salience or {}
  end
  local function hover_at(line, character)
    local r = client:request_sync('textDocument/hover', {
      textDocument = { uri = vim.uri_from_bufnr(buf) },
      position = { line = line, character = character },
    }, 10000, buf)
    return r and r.result and r.result.contents and r.result.contents.value or ''
  end

  -- Method completion offers the perturbation methods.
  local methods = vim.fn.getcompletion('SalienceMethod ', 'cmdline')
  check('method completion has leave_one_out and ablation_surrogate', vim.tbl_contains(methods, 'leave_one_out') and vim.tbl_contains(methods, 'ablation_surrogate'), methods)

  -- Contrast: why the (visual) target rather than another text.
  vim.api.nvim_buf_set_mark(buf, '<', 6, 29, {})
  vim.api.nvim_buf_set_mark(buf, '>', 6, 47, {})
  vim.cmd("'<,'>SalienceContrast Answer at length.")
  vim.wait(120000, function()
    return state().contrast ~= nil
  end, 100)
  check('contrast compute reports the alternative', state().contrast == 'Answer at length.', state())
  local tmark2
  for _, x in ipairs(marks(buf, ps.namespace)) do
    if x[4].hl_group == 'PromptSalienceTarget' then
      tmark2 = x
    end
  end
  check('contrast keeps the visual target', tmark2 ~= nil and tmark2[2] == 5 and tmark2[3] == 29, tmark2)

  -- Contrast on the whole response (three sentences before it: enough for the deletion test).
  vim.cmd('SalienceContrast It is green.')
  vim.wait(120000, function()
    return state().contrast == 'It is green.'
  end, 100)
  check('contrast on the response', state().contrast == 'It is green.' and #marks(buf, ps.namespace) > 0, state())
  local htext = hover_at(5, 4)
  check('hover shows the contrast', htext:find('rather than "It is green."', 1, true) ~= nil, htext)

  -- Faithfulness: the background check's verdict arrives in a second notification and is echoed.
  vim.wait(180000, function()
    return state().faithfulness ~= nil
  end, 100)
  local verdict = state().faithfulness
  check('background faithfulness verdict arrives', type(verdict) == 'string' and #verdict > 0, state())
  check('verdict echoed', vim.iter(messages):any(function(m)
    return m:find('faithfulness', 1, true) ~= nil and m:find(verdict or '\0', 1, true) ~= nil
  end), messages)
  local n_msgs = #messages
  vim.cmd('SalienceFaithfulness')
  vim.wait(30000, function()
    return #messages > n_msgs
  end, 50)
  check(':SalienceFaithfulness echoes the cached verdict', messages[n_msgs + 1] ~= nil and messages[n_msgs + 1]:find(verdict or '\0', 1, true) ~= nil, messages)
  local fres = client:request_sync('workspace/executeCommand', { command = 'promptSalience.checkFaithfulness', arguments = { { uri = vim.uri_from_bufnr(buf) } } }, 30000, buf)
  local f = fres and fres.result or {}
  check('checkFaithfulness is cached with a deletion curve', f.cached == true and f.faithfulness and #f.faithfulness.points > 0, f)

  -- Difference: compute, edit the question, compute again, paint the change. Before/after
  -- compares maps of the same target only, so the response is fixed in the file first.
  vim.api.nvim_buf_set_lines(buf, -1, -1, false, { '<!-- response -->', 'Blue.' })
  vim.cmd('SalienceCompute')
  vim.wait(120000, function()
    local st = state()
    return st.contrast == nil and st.faithfulness == nil and #marks(buf, ps.namespace) > 0 and st.granularity == 'sentence'
  end, 100)
  vim.api.nvim_buf_set_lines(buf, 7, 8, false, { 'What colour is the sky at noon on a clear day?' })
  local version = vim.lsp.util.buf_versions[buf]
  -- The map follows the edit: the untouched sentences keep their colour, the edited one is unpainted.
  vim.wait(10000, function()
    return state().version == version and state().edited
  end, 50)
  local function painted_on(line)
    return vim.iter(marks(buf, ps.namespace)):any(function(m)
      return m[2] == line and m[4].hl_group ~= 'PromptSalienceTarget'
    end)
  end
  check('an edit keeps the map where it did not touch', state().edited and painted_on(5) and not painted_on(7), marks(buf, ps.namespace))
  vim.cmd('SalienceCompute')
  vim.wait(120000, function()
    return state().version == version and not state().edited
  end, 100)
  check('recompute after an edit compares with the previous result', (state().compared or 0) >= 2, state())
  htext = hover_at(5, 4)
  check('hover shows before and after', htext:find('before the last change', 1, true) ~= nil, htext)
  vim.cmd('SalienceDifference on')
  vim.wait(10000, function()
    return state().difference == true
  end, 50)
  check('difference on', state().difference == true and #marks(buf, ps.namespace) > 0, state())
  htext = hover_at(5, 4)
  check('hover shows the change', htext:find('Change since the previous result', 1, true) ~= nil, htext)
  vim.cmd('SalienceDifference')
  vim.wait(10000, function()
    return state().difference == false
  end, 50)
  check('difference toggles off', state().difference == false, state())
  vim.notify = notify

  vim.cmd('SalienceClear')
  check('clear', #marks(buf, ps.namespace) == 0)
end, debug.traceback)

if not ok then
  failed = failed + 1
  io.stderr:write('ERROR ' .. tostring(err) .. '\n')
end
io.stderr:write(string.format('%d passed, %d failed\n', passed, failed))
if failed > 0 then
  vim.cmd('cquit 1')
else
  vim.cmd('qa!')
end
