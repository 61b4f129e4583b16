-- prompt-salience for Neovim: a thin client. All logic lives in the language server; this
-- starts it, passes the selection as the target, and paints what it sends back.
local M = {}

local NAME = 'prompt_salience'
local ns = vim.api.nvim_create_namespace('prompt_salience')
M.namespace = ns

M.config = {
  cmd = { 'prompt-salience', 'lsp' },
  settings = {},
  filetypes = { 'promptmd' },
}

-- Background colours: green raises the target's probability, red lowers it, blue is unsigned.
local function blend(rgb, a)
  local function ch(c)
    return math.floor(255 + (c - 255) * a + 0.5)
  end
  return string.format('#%02x%02x%02x', ch(rgb[1]), ch(rgb[2]), ch(rgb[3]))
end

function M.define_highlights()
  local hues = { Pos = { 30, 160, 70 }, Neg = { 210, 50, 50 }, Level = { 40, 110, 220 } }
  for name, rgb in pairs(hues) do
    for level = 1, 8 do
      vim.api.nvim_set_hl(0, 'PromptSalience' .. name .. level, { default = true, bg = blend(rgb, level / 8 * 0.85), fg = '#000000' })
    end
  end
  vim.api.nvim_set_hl(0, 'PromptSalienceTarget', { default = true, underline = true, bold = true })
  -- Semantic tokens: one group per level modifier, linked to the named groups above.
  for level = 1, 8 do
    vim.api.nvim_set_hl(0, '@lsp.mod.level' .. level .. '.promptmd', { default = true, link = 'PromptSalienceLevel' .. level })
  end
  vim.api.nvim_set_hl(0, '@lsp.type.salienceTarget.promptmd', { default = true, link = 'PromptSalienceTarget' })
end

local function client_for(bufnr)
  return vim.lsp.get_clients({ bufnr = bufnr, name = NAME })[1]
end

--- Paints `promptSalience/result`: signed colours need sign and level together, which
--- semantic-token modifiers alone cannot give a highlight group.
local function on_result(_, result, ctx)
  local bufnr = vim.uri_to_bufnr(result.uri)
  if not vim.api.nvim_buf_is_loaded(bufnr) then
    return
  end
  local client = vim.lsp.get_client_by_id(ctx.client_id)
  local enc = client and client.offset_encoding or 'utf-16'
  vim.api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
  if vim.lsp.util.buf_versions[bufnr] ~= result.version then
    return -- computed for other text
  end
  local function col(pos)
    local line = vim.api.nvim_buf_get_lines(bufnr, pos.line, pos.line + 1, false)[1] or ''
    return vim.str_byteindex(line, enc, pos.character, false)
  end
  -- A change since the previous result has a sign even for an unsigned method.
  local signed = result.signed or result.difference == true
  local compared = 0
  for _, s in ipairs(result.segments) do
    if s.before ~= nil and s.before ~= vim.NIL then
      compared = compared + 1
    end
    if s.level > 0 then
      local group = (not signed) and 'PromptSalienceLevel' or (s.score >= 0 and 'PromptSaliencePos' or 'PromptSalienceNeg')
      vim.api.nvim_buf_set_extmark(bufnr, ns, s.range.start.line, col(s.range.start), {
        end_row = s.range['end'].line,
        end_col = col(s.range['end']),
        hl_group = group .. s.level,
        priority = 200,
      })
    end
  end
  local t = result.target
  if t and t ~= vim.NIL then
    vim.api.nvim_buf_set_extmark(bufnr, ns, t.start.line, col(t.start), {
      end_row = t['end'].line,
      end_col = col(t['end']),
      hl_group = 'PromptSalienceTarget',
      priority = 201,
    })
  end
  local function opt(v)
    if v == vim.NIL then
      return nil
    end
    return v
  end
  local generated = opt(result.generatedResponse)
  local old = vim.b[bufnr].prompt_salience or {}
  local state = {
    version = result.version,
    granularity = result.granularity,
    method = result.method,
    gain = result.gain,
    model = result.model,
    generated = generated,
    contrast = opt(result.contrast),
    difference = result.difference == true,
    faithfulness = opt(result.faithfulness),
    -- Segments that also had a score in the previous result (hover shows before/after).
    compared = compared,
  }
  vim.b[bufnr].prompt_salience = state
  if generated and generated ~= old.generated then
    vim.notify('prompt-salience: explained the generated response (not in the file): ' .. generated, vim.log.levels.INFO)
  end
  -- The verdict arrives in a second notification once the background check is done; the
  -- notification is sent again on every re-render, so say it only when it is new.
  if state.faithfulness and state.faithfulness ~= old.faithfulness then
    vim.notify('prompt-salience: faithfulness (' .. result.granularity .. 's): ' .. state.faithfulness, vim.log.levels.INFO)
  end
end

local function exec(bufnr, command, args, on_done)
  local client = client_for(bufnr)
  if not client then
    vim.notify('prompt-salience: no language server attached to this buffer', vim.log.levels.WARN)
    return
  end
  args.uri = vim.uri_from_bufnr(bufnr)
  client:request('workspace/executeCommand', { command = command, arguments = { args } }, function(err, res)
    if err then
      vim.notify('prompt-salience: ' .. err.message, vim.log.levels.ERROR)
    elseif on_done then
      on_done(res)
    end
  end, bufnr)
end
M.exec = exec

--- Computes salience; `opts` is a user command's (a range makes the target), `extra` adds
--- arguments of `promptSalience.compute` (`contrast`, `method`, `granularity`).
function M.compute(opts, extra)
  local bufnr = vim.api.nvim_get_current_buf()
  local args = vim.deepcopy(extra or {})
  if opts and opts.range and opts.range > 0 then
    local client = client_for(bufnr)
    local enc = client and client.offset_encoding or 'utf-16'
    local function last_col(row)
      local line = vim.api.nvim_buf_get_lines(bufnr, row - 1, row, false)[1] or ''
      return math.max(#line - 1, 0)
    end
    -- Whole lines for a typed range; the exact characters for a visual selection.
    local s, e = { opts.line1, 0 }, { opts.line2, last_col(opts.line2) }
    local ms, me = vim.api.nvim_buf_get_mark(bufnr, '<'), vim.api.nvim_buf_get_mark(bufnr, '>')
    if ms[1] == opts.line1 and me[1] == opts.line2 then
      s, e = ms, { me[1], math.min(me[2], last_col(me[1])) }
    end
    -- make_given_range_params treats the end as inclusive, as marks are.
    args.range = vim.lsp.util.make_given_range_params(s, e, bufnr, enc).range
  end
  exec(bufnr, 'promptSalience.compute', args)
end

--- Why the target rather than `text`: computes with `text` as the contrastive alternative.
function M.contrast(text, opts)
  if not text or vim.trim(text) == '' then
    vim.notify('prompt-salience: give the alternative text, e.g. :SalienceContrast green', vim.log.levels.WARN)
    return
  end
  M.compute(opts, { contrast = text })
end

local function step_gain(bufnr, up)
  local state = vim.b[bufnr].prompt_salience or {}
  local gain = state.gain or 1.0
  gain = up and gain * 1.5 or gain / 1.5
  exec(bufnr, 'promptSalience.setGain', { gain = gain })
end

--- The deletion test of the painted map (cached, or run now); the verdict is echoed.
function M.faithfulness()
  local bufnr = vim.api.nvim_get_current_buf()
  exec(bufnr, 'promptSalience.checkFaithfulness', {}, function(res)
    -- A fresh check also re-sends the result notification, which echoes the verdict.
    if res and res.cached and res.faithfulness then
      local f = res.faithfulness
      vim.notify('prompt-salience: faithfulness (' .. tostring(f.level) .. 's): ' .. tostring(f.verdict), vim.log.levels.INFO)
    end
  end)
end

--- Paints the change since the previous result (`on` true), the scores again (false), or
--- toggles (nil).
function M.difference(on)
  local bufnr = vim.api.nvim_get_current_buf()
  if on == nil then
    on = not (vim.b[bufnr].prompt_salience or {}).difference
  end
  exec(bufnr, 'promptSalience.showDifference', { value = on })
end

M.methods = { 'grad_dot_input', 'grad_l2', 'integrated_gradients', 'leave_one_out', 'ablation_surrogate' }

function M.setup(opts)
  M.config = vim.tbl_deep_extend('force', M.config, opts or {})
  M.define_highlights()
  vim.api.nvim_create_autocmd('ColorScheme', { callback = M.define_highlights })
  local cfg = {
    cmd = M.config.cmd,
    filetypes = M.config.filetypes,
    root_markers = { '.git' },
    init_options = M.config.settings,
    settings = { promptSalience = M.config.settings },
    handlers = { ['promptSalience/result'] = on_result },
  }
  if vim.lsp.config and vim.lsp.enable then
    vim.lsp.config(NAME, cfg)
    vim.lsp.enable(NAME)
  else
    -- Neovim 0.10: start per buffer.
    vim.api.nvim_create_autocmd('FileType', {
      pattern = M.config.filetypes,
      callback = function(args)
        vim.lsp.start(vim.tbl_extend('force', cfg, { name = NAME, root_dir = vim.fs.root(args.buf, '.git') or vim.fn.getcwd() }), { bufnr = args.buf })
      end,
    })
  end
  local cmd = vim.api.nvim_create_user_command
  cmd('SalienceGenerate', function()
    exec(vim.api.nvim_get_current_buf(), 'promptSalience.generate', {})
  end, { desc = 'Generate the response into the prompt file' })
  cmd('SalienceCompute', function(o)
    M.compute(o)
  end, { range = true, desc = 'Compute salience (a visual range is the target)' })
  cmd('SalienceGranularity', function(o)
    exec(vim.api.nvim_get_current_buf(), 'promptSalience.setGranularity', { granularity = o.args })
  end, { nargs = 1, complete = function()
    return { 'token', 'word', 'sentence', 'line', 'paragraph', 'block' }
  end })
  cmd('SalienceMethod', function(o)
    exec(vim.api.nvim_get_current_buf(), 'promptSalience.setMethod', { method = o.args })
  end, { nargs = 1, complete = function(lead)
    return vim.tbl_filter(function(m)
      return vim.startswith(m, lead)
    end, M.methods)
  end })
  cmd('SalienceGain', function(o)
    step_gain(vim.api.nvim_get_current_buf(), o.args ~= '-')
  end, { nargs = 1, complete = function()
    return { '+', '-' }
  end, desc = 'Raise (+) or lower (-) the display gain' })
  cmd('SalienceContrast', function(o)
    -- `+` / `-` alone step the display gain, as this command did before :SalienceGain.
    if o.args == '+' or o.args == '-' then
      step_gain(vim.api.nvim_get_current_buf(), o.args == '+')
      return
    end
    M.contrast(o.args, o)
  end, { nargs = '+', range = true, desc = 'Compute why the target rather than {text} (a visual range is the target)' })
  cmd('SalienceFaithfulness', function()
    M.faithfulness()
  end, { desc = 'Check the painted map by deleting its top segments' })
  cmd('SalienceDifference', function(o)
    local on = nil
    if o.args == 'on' then
      on = true
    elseif o.args == 'off' then
      on = false
    elseif o.args ~= '' then
      vim.notify('prompt-salience: :SalienceDifference [on|off]', vim.log.levels.WARN)
      return
    end
    M.difference(on)
  end, { nargs = '?', complete = function()
    return { 'on', 'off' }
  end, desc = 'Paint the change since the previous result (toggle, or on/off)' })
  cmd('SalienceClear', function()
    local bufnr = vim.api.nvim_get_current_buf()
    vim.api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
    exec(bufnr, 'promptSalience.clear', {})
  end, {})
end

return M
