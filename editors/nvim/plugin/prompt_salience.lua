-- Filetype detection for *.prompt.md; the language server is attached by setup().
if vim.g.loaded_prompt_salience then
  return
end
vim.g.loaded_prompt_salience = true

-- Only the last extension counts for `extension`, so match the whole name.
vim.filetype.add({ pattern = { ['.*%.prompt%.md'] = 'promptmd' } })
pcall(vim.treesitter.language.register, 'markdown', 'promptmd')
vim.api.nvim_create_autocmd('FileType', {
  pattern = 'promptmd',
  callback = function(args)
    -- Markdown syntax where tree-sitter is not used.
    if vim.bo[args.buf].syntax == '' or vim.bo[args.buf].syntax == 'promptmd' then
      vim.bo[args.buf].syntax = 'markdown'
    end
  end,
})
