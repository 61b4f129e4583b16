#!/usr/bin/env bash
# Runs the headless Neovim tests with a real Neovim 0.11.4 and the release binary: run.lua
# through setup(), then enable.lua through vim.lsp.enable() alone.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
tools=${EDITOR_TOOLS:-$root/.cache/editors}
mkdir -p "$tools"
nvim=$(bash "$root/editors/test-tools/install-nvim.sh" "$tools/nvim")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bin="$root/target/release/prompt-salience"
echo "== setup(): the commands end to end" >&2
PROMPT_SALIENCE_BIN="$bin" PLUGIN_DIR="$root/editors/nvim" \
  TEST_FILE="$tmp/sky.prompt.md" timeout 600 "$nvim" --headless -u NONE -i NONE -c "luafile $here/run.lua"
# The plugin on 'runtimepath' as a user has it (--clean sources its plugin/), no setup().
echo "== vim.lsp.enable('prompt_salience') without setup()" >&2
PROMPT_SALIENCE_BIN="$bin" TEST_FILE="$tmp/enable.prompt.md" \
  timeout 300 "$nvim" --headless --clean --cmd "set rtp^=$root/editors/nvim" -c "luafile $here/enable.lua"
