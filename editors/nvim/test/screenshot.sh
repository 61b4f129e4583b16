#!/usr/bin/env bash
# A screenshot of the plugin in a real Neovim: tmux runs it, capture-pane keeps the colours,
# Chromium renders them. usage: screenshot.sh OUT.png
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
out=${1:?usage: screenshot.sh OUT.png}
tools=${EDITOR_TOOLS:-$root/.cache/editors}
nvim=$(bash "$root/../shared/editor-testing/install-nvim.sh" "$tools/nvim")
tmp=$(mktemp -d)
trap 'tmux kill-session -t ps-shot 2>/dev/null || true; rm -rf "$tmp"' EXIT
cp "$root/prompts/few-shot-classification.prompt.md" "$tmp/"
cat > "$tmp/init.lua" <<LUA
vim.opt.rtp:prepend('$root/editors/nvim')
vim.o.termguicolors = true
vim.o.number = true
vim.cmd('filetype on')
vim.cmd('runtime plugin/prompt_salience.lua')
require('prompt_salience').setup({ cmd = { '$root/target/release/prompt-salience', 'lsp' } })
LUA
tmux new-session -d -s ps-shot -x 110 -y 30 "TERM=xterm-256color COLORTERM=truecolor $nvim -u $tmp/init.lua -i NONE $tmp/few-shot-classification.prompt.md"
tmux set -t ps-shot -g terminal-features ',*:RGB' 2>/dev/null || true
sleep 3
tmux send-keys -t ps-shot ':SalienceCompute' Enter
sleep "${WAIT:-25}"
tmux send-keys -t ps-shot ':13' Enter 'K'
sleep 2
tmux capture-pane -t ps-shot -e -p > "$tmp/screen.ansi"
python3 "$here/ansi_to_html.py" < "$tmp/screen.ansi" > "$tmp/screen.html"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$tmp/chrome" --hide-scrollbars \
  --window-size=1000,640 --screenshot="$out" "file://$tmp/screen.html" 2>/dev/null
echo "$out"
