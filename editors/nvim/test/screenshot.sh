#!/usr/bin/env bash
# A screenshot of the plugin in a real Neovim: tmux runs it, capture-pane keeps the colours,
# Chromium renders them. usage: screenshot.sh OUT.png
#
# Env (all optional; the defaults give the README's screenshot of the few-shot example):
#   PROMPT      prompt file to show; a copy is opened, the file itself is never changed
#               (default prompts/few-shot-classification.prompt.md)
#   COMMANDS    Ex commands to run after the file opened, one a line, without the ':'
#               (default SalienceCompute)
#   WAIT        seconds to wait after the commands (default 25); with WAIT_UNTIL, the most to wait
#   WAIT_UNTIL  a Lua expression evaluated in Neovim every second; the wait ends once it is true,
#               e.g. '(vim.b.prompt_salience or {}).faithfulness ~= nil' (the background verdict)
#   LINE        line to put the cursor on before KEYS (default 13)
#   KEYS        normal-mode keys sent on LINE (default K, the hover); empty for none
#   COLS, ROWS  terminal size (default 110x30)
#   CMDHEIGHT   lines of the message area (default 1); 2 keeps a long echo (the faithfulness verdict)
#               from stopping Neovim at the hit-enter prompt
#   PAGE_BG, PAGE_FG  colours of cells without their own (default white, #1f1f1f); #14161b and #e0e2ea
#               match Neovim's default dark scheme, so the picture looks like the terminal
#   INIT_LUA    Lua appended to the init file (e.g. a K mapping that places the hover float)
#   WINDOW      Chromium window size in pixels, "W,H" (default: fits COLS x ROWS; 1000,640 for 110x30)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
out=${1:?usage: screenshot.sh OUT.png}
case $out in /*) ;; *) out=$PWD/$out ;; esac
prompt=${PROMPT:-$root/prompts/few-shot-classification.prompt.md}
commands=${COMMANDS:-SalienceCompute}
wait_s=${WAIT:-25}
line=${LINE:-13}
keys=${KEYS-K}
cols=${COLS:-110}
rows=${ROWS:-30}
if [ -n "${WINDOW:-}" ]; then
  window=$WINDOW
elif [ "$cols" = 110 ] && [ "$rows" = 30 ]; then
  window=1000,640
else
  # ansi_to_html.py: 15 px DejaVu Sans Mono (9.03 px a column), 20.25 px a row, 12 px margins
  window=$(awk -v c="$cols" -v r="$rows" 'BEGIN { printf "%d,%d", c * 9.04 + 30, r * 20.25 + 30 }')
fi
tools=${EDITOR_TOOLS:-$root/.cache/editors}
nvim=$(bash "$root/editors/test-tools/install-nvim.sh" "$tools/nvim")
session=ps-shot-$$
tmp=$(mktemp -d)
trap 'tmux kill-session -t "$session" 2>/dev/null || true; rm -rf "$tmp"' EXIT
cp "$prompt" "$tmp/"
file=$tmp/$(basename "$prompt")
cat > "$tmp/init.lua" <<LUA
vim.opt.rtp:prepend('$root/editors/nvim')
vim.o.termguicolors = true
vim.o.number = true
vim.o.cmdheight = ${CMDHEIGHT:-1}
vim.cmd('filetype on')
vim.cmd('runtime plugin/prompt_salience.lua')
require('prompt_salience').setup({ cmd = { '$root/target/release/prompt-salience', 'lsp' } })
_G.ps_screenshot_ready = function()
  local ok, v = pcall(function() return ${WAIT_UNTIL:-true} end)
  return (ok and v) and 1 or 0
end
${INIT_LUA:-}
LUA
# The server finds its models through PROMPT_SALIENCE_CACHE; a running tmux server would not pass it on.
envs="TERM=xterm-256color COLORTERM=truecolor"
[ -n "${PROMPT_SALIENCE_CACHE:-}" ] && envs="$envs PROMPT_SALIENCE_CACHE=$(printf %q "$PROMPT_SALIENCE_CACHE")"
tmux new-session -d -s "$session" -x "$cols" -y "$rows" \
  "$envs $nvim -u $tmp/init.lua -i NONE --listen $tmp/nvim.sock $(printf %q "$file")"
tmux set -t "$session" -g terminal-features ',*:RGB' 2>/dev/null || true
sleep 3
while IFS= read -r c; do
  [ -n "$c" ] || continue
  tmux send-keys -t "$session" ":$c" Enter
  sleep 0.5
done <<< "$commands"
if [ -n "${WAIT_UNTIL:-}" ]; then
  start=$SECONDS
  until [ "$(timeout 5 "$nvim" --server "$tmp/nvim.sock" --remote-expr 'v:lua.ps_screenshot_ready()' 2>/dev/null)" = 1 ]; do
    if (( SECONDS - start >= wait_s )); then
      echo "screenshot.sh: WAIT_UNTIL still false after ${wait_s}s; taking the screenshot anyway" >&2
      break
    fi
    sleep 1
  done
  sleep 1
else
  sleep "$wait_s"
fi
# Normal-mode motion, so the message line keeps the plugin's last echo.
tmux send-keys -t "$session" "${line}G"
[ -n "$keys" ] && tmux send-keys -t "$session" "$keys"
sleep 2
tmux capture-pane -t "$session" -e -p > "$tmp/screen.ansi"
python3 "$here/ansi_to_html.py" "${PAGE_BG:-#ffffff}" "${PAGE_FG:-#1f1f1f}" < "$tmp/screen.ansi" > "$tmp/screen.html"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$tmp/chrome" --hide-scrollbars \
  --window-size="$window" --screenshot="$out" "file://$tmp/screen.html" 2>/dev/null
echo "$out"
