-- prompt-salience for Neovim 0.11+: a thin client. All logic lives in the language server;
-- lsp/prompt_salience.lua configures it, this passes the selection as the target and paints
-- what it sends back. The commands are made in plugin/prompt_salience.lua.
local M = {}

local NAME = 'prompt_salience'
M.name = NAME
local ns = vim.api.nvim_create_namespace('prompt_salience')
M.namespace = ns

--- The options given to setup() (merged over these defaults); the server's config itself is
--- `vim.lsp.config.prompt_salience` (lsp/prompt_salience.lua and any overrides).
M.config = {
  cmd = { 'prompt-salience', 'lsp' },
  settings = {},
  filetypes = { 'promptmd' },
}

--- False (after an error message, once) on a Neovim older than 0.11.
function M.supported()
  if vim.fn.has('nvim-0.11') == 1 then
    return true
  end
  local v = vim.version()
  vim.notify_once(string.format('prompt-salience: needs Neovim 0.11 or newer (this is %d.%d.%d)', v.major, v.minor, v.patch), vim.log.levels.ERROR)
  return false
end

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
function M.on_result(_, result, ctx)
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
    -- The text changed since the map was computed: it follows the edits, touched segments unpainted.
    edited = result.edited == true,
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

function M.step_gain(bufnr, up)
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
      vim.notify('prompt-salience: faithfulness (' .. tostring(f.level) .. 's): ' .. tostring(f.summary or (tostring(f.verdict) .. ': ' .. tostring(f.reason))), vim.log.levels.INFO)
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

M.methods = { 'grad_l2', 'grad_dot_input', 'integrated_gradients', 'leave_one_out', 'ablation_surrogate' }

--- Writes the model's response into the file.
function M.generate()
  exec(vim.api.nvim_get_current_buf(), 'promptSalience.generate', {})
end

function M.set_granularity(level)
  exec(vim.api.nvim_get_current_buf(), 'promptSalience.setGranularity', { granularity = level })
end

function M.set_method(method)
  exec(vim.api.nvim_get_current_buf(), 'promptSalience.setMethod', { method = method })
end

--- Removes the highlights here and the server's result for the buffer.
function M.clear()
  local bufnr = vim.api.nvim_get_current_buf()
  vim.api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
  exec(bufnr, 'promptSalience.clear', {})
end

--- Optional: `vim.lsp.enable('prompt_salience')` does the same with the defaults. `opts.cmd`,
--- `opts.filetypes` and any other |vim.lsp.Config| field override lsp/prompt_salience.lua;
--- `opts.settings` are the server's settings (the `promptSalience` section).
function M.setup(opts)
  if not M.supported() then
    return
  end
  opts = opts or {}
  M.config = vim.tbl_deep_extend('force', M.config, opts)
  -- Filetype detection and the commands, where the plugin directory was not sourced at startup.
  if not vim.g.loaded_prompt_salience then
    vim.cmd.runtime('plugin/prompt_salience.lua')
  end
  local overrides = vim.deepcopy(opts)
  overrides.settings = opts.settings and { promptSalience = opts.settings } or nil
  if next(overrides) ~= nil then
    vim.lsp.config(NAME, overrides)
  end
  vim.lsp.enable(NAME)
end

if vim.fn.has('nvim-0.11') == 1 then
  M.define_highlights()
end

return M
