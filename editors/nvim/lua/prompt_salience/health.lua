-- :checkhealth prompt_salience
local M = {}

function M.check()
  local h = vim.health
  h.start('prompt-salience')
  local cfg = require('prompt_salience').config
  local bin = cfg.cmd[1]
  if vim.fn.executable(bin) == 1 then
    local v = vim.fn.system({ bin, '--version' })
    h.ok('binary: ' .. vim.fn.exepath(bin) .. ' (' .. vim.trim(v) .. ')')
    local list = vim.fn.system({ bin, 'model', 'list' })
    if vim.v.shell_error == 0 then
      for _, line in ipairs(vim.split(vim.trim(list), '\n')) do
        h.info(line)
      end
    else
      h.warn('`' .. bin .. ' model list` failed: ' .. list)
    end
  else
    h.error('binary `' .. bin .. '` not found', { 'build it with `cargo build --release`', 'or pass cmd = { "/path/to/prompt-salience", "lsp" } to setup()' })
  end
  local clients = vim.lsp.get_clients({ name = 'prompt_salience' })
  if #clients > 0 then
    h.ok(#clients .. ' server(s) running; position encoding ' .. clients[1].offset_encoding)
  else
    h.info('no server running (open a *.prompt.md file)')
  end
end

return M
