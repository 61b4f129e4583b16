#!/usr/bin/env bash
# The screenshots of docs/tutorial.md, in docs/tutorial/: the menu few-shot case study in Neovim and in
# VS Code (real editors, real server: target/release/prompt-salience), and the HTML reports of
# docs/case-studies/run.sh (run that first); `readme`: the README's Neovim screenshot and headline report
# (docs/). usage: tutorial-screenshots.sh [nvim] [vscode] [reports] [readme] (default all). Env: EDITOR_TOOLS (where the editors are installed), PROMPT_SALIENCE_CACHE (models).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=docs/tutorial
mkdir -p "$out"
tools=${EDITOR_TOOLS:-$root/.cache/editors}
what=${*:-nvim vscode reports readme}
case_file=prompts/case-studies/menu-few-shot.prompt.md
for w in $what; do
  case $w in
  nvim)
    # Line 24: "Restrictions: vegetarian", the third example (the wrong label "Lamb kebab"). K opens the
    # hover to the right of the text, so that the float hides none of the map.
    PROMPT=$case_file COMMANDS=SalienceCompute LINE=24 KEYS=K COLS=140 ROWS=42 CMDHEIGHT=2 WAIT=180 \
      PAGE_BG='#14161b' PAGE_FG='#e0e2ea' \
      INIT_LUA="vim.keymap.set('n', 'K', function() vim.lsp.buf.hover({ offset_x = 64, max_width = 66 }) end)" \
      WAIT_UNTIL='(vim.b.prompt_salience or {}).faithfulness ~= nil' \
      bash editors/nvim/test/screenshot.sh "$out/nvim-menu-few-shot.png"
    ;;
  vscode)
    # Split editor: the whole map on the left, the hover on the third example ("Restrictions: vegetarian"
    # above "Menu: Lamb kebab") on the right.
    HOVER_TEXT='Menu: Lamb kebab' HOVER_OFFSET=-1 SPLIT=1 HOVER_WAIT='faithfulness:' WAIT_S=240 VIEWPORT=1600,820 \
      bash editors/vscode/test/screenshot.sh "$out/vscode-menu-few-shot.png" "$case_file"
    ;;
  reports)
    code_server=$(bash "$root/editors/test-tools/install-code-server.sh" "$tools/vscode") # playwright-core
    export PLAYWRIGHT_CORE=$tools/vscode/e2e/node_modules/playwright-core/index.mjs
    shot() { node editors/html-screenshot.mjs "docs/case-studies/$1" "$out/$2" "${3:-1200}" "${4:-1400}"; }
    shot menu-few-shot.html report-menu-few-shot.png 1200 1400
    shot principles.compare.html compare-principles.png 1200 1400
    shot models.compare.html compare-models.png 1200 1400
    shot math-chain-of-thought.html report-math.png 1200 1400
    ;;
  readme)
    # The headline example: the last review (line 27) hovered, the float to the right of the map.
    PROMPT=prompts/few-shot-classification.prompt.md COMMANDS=SalienceCompute LINE=27 KEYS=K COLS=160 ROWS=30 \
      CMDHEIGHT=2 WAIT=60 PAGE_BG='#14161b' PAGE_FG='#e0e2ea' \
      INIT_LUA="vim.keymap.set('n', 'K', function() vim.lsp.buf.hover({ offset_x = 84, max_width = 70 }) end)" \
      WAIT_UNTIL='(vim.b.prompt_salience or {}).faithfulness ~= nil' \
      bash editors/nvim/test/screenshot.sh docs/neovim.png
    code_server=$(bash "$root/editors/test-tools/install-code-server.sh" "$tools/vscode") # playwright-core
    PLAYWRIGHT_CORE=$tools/vscode/e2e/node_modules/playwright-core/index.mjs \
      node editors/html-screenshot.mjs docs/few-shot-classification.report.html docs/few-shot-classification.report.png 1100 900
    ;;
  *) echo "unknown: $w (nvim, vscode, reports, readme)" >&2; exit 2 ;;
  esac
done
