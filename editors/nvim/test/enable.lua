-- Headless test of the setup()-free start: the plugin on 'runtimepath' (nvim --clean --cmd
-- 'set rtp^=...' sources its plugin/), `vim.lsp.config` + `vim.lsp.enable('prompt_salience')`,
-- real server and model. Env: PROMPT_SALIENCE_BIN, TEST_FILE (a writable *.prompt.md path).
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

local ok, err = xpcall(function()
  check('plugin/ sourced at startup, module not loaded yet', vim.g.loaded_prompt_salience == true and package.loaded['prompt_salience'] == nil)
  check('commands exist without setup()', vim.fn.exists(':SalienceCompute') == 2 and vim.fn.exists(':SalienceClear') == 2)

  -- Only the path of the binary and a setting; the rest comes from lsp/prompt_salience.lua.
  vim.lsp.config('prompt_salience', {
    cmd = { os.getenv('PROMPT_SALIENCE_BIN'), 'lsp' },
    settings = { promptSalience = { granularity = 'word' } },
  })
  vim.lsp.enable('prompt_salience')
  local cfg = vim.lsp.config.prompt_salience
  check('config from lsp/prompt_salience.lua', cfg and vim.deep_equal(cfg.filetypes, { 'promptmd' }) and cfg.handlers and cfg.handlers['promptSalience/result'] ~= nil, cfg)

  local file = os.getenv('TEST_FILE')
  vim.fn.writefile({
    '---',
    'salience:',
    '  max_new_tokens: 4',
    '---',
    'Answer in one word.',
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
  check('server attached', client ~= nil and client.initialized)
  check('highlight groups defined', next(vim.api.nvim_get_hl(0, { name = 'PromptSaliencePos8' })) ~= nil)

  local ps = require('prompt_salience')
  vim.cmd('SalienceCompute')
  vim.wait(120000, function()
    return #vim.api.nvim_buf_get_extmarks(buf, ps.namespace, 0, -1, {}) > 0
  end, 100)
  local n = #vim.api.nvim_buf_get_extmarks(buf, ps.namespace, 0, -1, {})
  local state = vim.b[buf].prompt_salience or {}
  check('result painted by the config handler', n > 0, n)
  check('settings reach the server (granularity word)', state.granularity == 'word', state)

  vim.cmd('checkhealth prompt_salience')
  local lines = vim.api.nvim_buf_get_lines(0, 0, -1, false)
  local text = table.concat(lines, '\n')
  check('checkhealth: version ok, enabled, no errors', text:find('Neovim 0.1', 1, true) ~= nil and text:find('enabled for filetypes: promptmd', 1, true) ~= nil and text:find('ERROR', 1, true) == nil, lines)
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
