-- :checkhealth prompt_salience
local M = {}

function M.check()
  local h = vim.health
  h.start('prompt-salience')
  local v = vim.version()
  local version = string.format('%d.%d.%d', v.major, v.minor, v.patch)
  if vim.fn.has('nvim-0.11') == 1 then
    h.ok('Neovim ' .. version)
  else
    h.error('Neovim ' .. version .. ': prompt-salience needs Neovim 0.11 or newer', { 'upgrade Neovim' })
    return
  end
  local ps = require('prompt_salience')
  local cfg = vim.lsp.config[ps.name]
  if not cfg then
    h.error('no `' .. ps.name .. '` LSP config', { 'is editors/nvim (with lsp/prompt_salience.lua) on runtimepath?' })
    return
  end
  if vim.lsp.is_enabled(ps.name) then
    h.ok('enabled for filetypes: ' .. table.concat(cfg.filetypes or {}, ', '))
  else
    h.warn('not enabled', { "call vim.lsp.enable('prompt_salience') or require('prompt_salience').setup()" })
  end
  if type(cfg.cmd) ~= 'table' then
    h.info('cmd is a function; not checking the binary')
  else
    local bin = cfg.cmd[1]
    if vim.fn.executable(bin) == 1 then
      local out = vim.fn.system({ bin, '--version' })
      h.ok('binary: ' .. vim.fn.exepath(bin) .. ' (' .. vim.trim(out) .. ')')
      local list = vim.fn.system({ bin, 'model', 'list' })
      if vim.v.shell_error == 0 then
        for _, line in ipairs(vim.split(vim.trim(list), '\n')) do
          h.info(line)
        end
      else
        h.warn('`' .. bin .. ' model list` failed: ' .. list)
      end
    else
      h.error('binary `' .. bin .. '` not found', {
        'build it with `cargo build --release`',
        "or set its path: vim.lsp.config('prompt_salience', { cmd = { '/path/to/prompt-salience', 'lsp' } })",
        'or pass cmd = { "/path/to/prompt-salience", "lsp" } to setup()',
      })
    end
  end
  local clients = vim.lsp.get_clients({ name = ps.name })
  if #clients > 0 then
    h.ok(#clients .. ' server(s) running; position encoding ' .. clients[1].offset_encoding)
  else
    h.info('no server running (open a *.prompt.md file)')
  end
end

return M
