-- Filetype detection for *.prompt.md, the highlight groups and the :Salience* commands. The
-- language server is started by `vim.lsp.enable('prompt_salience')` (lsp/prompt_salience.lua)
-- or by require('prompt_salience').setup(). The Lua module loads on first use.
if vim.g.loaded_prompt_salience then
  return
end
vim.g.loaded_prompt_salience = true

if vim.fn.has('nvim-0.11') == 0 then
  local v = vim.version()
  vim.notify_once(string.format('prompt-salience: needs Neovim 0.11 or newer (this is %d.%d.%d)', v.major, v.minor, v.patch), vim.log.levels.ERROR)
  return
end

local function ps()
  return require('prompt_salience')
end

-- Only the last extension counts for `extension`, so match the whole name.
vim.filetype.add({ pattern = { ['.*%.prompt%.md'] = 'promptmd' } })
pcall(vim.treesitter.language.register, 'markdown', 'promptmd')

local group = vim.api.nvim_create_augroup('prompt_salience', { clear = true })
vim.api.nvim_create_autocmd('FileType', {
  group = group,
  pattern = 'promptmd',
  callback = function(args)
    -- Markdown syntax where tree-sitter is not used.
    if vim.bo[args.buf].syntax == '' or vim.bo[args.buf].syntax == 'promptmd' then
      vim.bo[args.buf].syntax = 'markdown'
    end
    -- Loading the module defines the highlight groups (the semantic tokens' too).
    ps()
  end,
})
vim.api.nvim_create_autocmd('ColorScheme', {
  group = group,
  callback = function()
    if package.loaded['prompt_salience'] then
      ps().define_highlights()
    end
  end,
})

local cmd = vim.api.nvim_create_user_command
cmd('SalienceGenerate', function()
  ps().generate()
end, { desc = 'Generate the response into the prompt file' })
cmd('SalienceCompute', function(o)
  ps().compute(o)
end, { range = true, desc = 'Compute salience (a visual range is the target)' })
cmd('SalienceGranularity', function(o)
  ps().set_granularity(o.args)
end, { nargs = 1, complete = function()
  return { 'token', 'word', 'sentence', 'line', 'paragraph', 'block', 'custom' }
end, desc = 'Show the scores at another granularity' })
cmd('SalienceMethod', function(o)
  ps().set_method(o.args)
end, { nargs = 1, complete = function(lead)
  return vim.tbl_filter(function(m)
    return vim.startswith(m, lead)
  end, ps().methods)
end, desc = 'Compute with another attribution method' })
cmd('SalienceGain', function(o)
  ps().step_gain(vim.api.nvim_get_current_buf(), o.args ~= '-')
end, { nargs = 1, complete = function()
  return { '+', '-' }
end, desc = 'Raise (+) or lower (-) the display gain' })
cmd('SalienceContrast', function(o)
  -- Always a contrastive target: the display gain is :SalienceGain.
  ps().contrast(o.args, o)
end, { nargs = '+', range = true, desc = 'Compute why the target rather than {text} (a visual range is the target)' })
cmd('SalienceFaithfulness', function()
  ps().faithfulness()
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
  ps().difference(on)
end, { nargs = '?', complete = function()
  return { 'on', 'off' }
end, desc = 'Paint the change since the previous result (toggle, or on/off)' })
cmd('SalienceClear', function()
  ps().clear()
end, { desc = 'Remove the highlights' })
