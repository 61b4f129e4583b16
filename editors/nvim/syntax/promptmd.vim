" Prompt files (*.prompt.md) are Markdown.
if exists('b:current_syntax')
  finish
endif
runtime! syntax/markdown.vim
