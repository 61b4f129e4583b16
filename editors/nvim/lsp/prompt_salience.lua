-- The prompt-salience language server for Neovim 0.11+ (|lsp-config|): with this plugin on
-- 'runtimepath', `vim.lsp.enable('prompt_salience')` starts it for *.prompt.md files, no
-- setup() needed. Override any field with `vim.lsp.config('prompt_salience', { ... })`, e.g.
-- `cmd = { '/path/to/prompt-salience', 'lsp' }` or `settings = { promptSalience = { ... } }`.
-- require('prompt_salience').setup() uses this same config.

---@type vim.lsp.Config
return {
  cmd = { 'prompt-salience', 'lsp' },
  filetypes = { 'promptmd' },
  root_markers = { '.git' },
  -- Server settings: pulled by the server with workspace/configuration, and sent as
  -- initializationOptions (below) unless `init_options` is set.
  settings = { promptSalience = {} },
  before_init = function(params, config)
    if config.init_options == nil then
      local s = (config.settings or {}).promptSalience
      if type(s) == 'table' and next(s) ~= nil then
        params.initializationOptions = s
      end
    end
  end,
  handlers = {
    -- The scores with their signs: the plugin paints them as extmarks.
    ['promptSalience/result'] = function(...)
      return require('prompt_salience').on_result(...)
    end,
  },
}
