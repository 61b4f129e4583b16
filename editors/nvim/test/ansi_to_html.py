"""Turns a `tmux capture-pane -e` dump (ANSI colours) into an HTML page, for screenshots."""
import html
import re
import sys

PALETTE = ["#000000", "#cd0000", "#00cd00", "#cdcd00", "#0000ee", "#cd00cd", "#00cdcd", "#e5e5e5",
           "#7f7f7f", "#ff0000", "#00ff00", "#ffff00", "#5c5cff", "#ff00ff", "#00ffff", "#ffffff"]


def xterm(n):
    if n < 16:
        return PALETTE[n]
    if n < 232:
        n -= 16
        steps = [0, 95, 135, 175, 215, 255]
        return "#%02x%02x%02x" % (steps[n // 36], steps[(n // 6) % 6], steps[n % 6])
    v = 8 + (n - 232) * 10
    return "#%02x%02x%02x" % (v, v, v)


def convert(text, fg0="#1f1f1f", bg0="#ffffff"):
    out, fg, bg, bold, ul = [], None, None, False, False
    for part in re.split(r"(\x1b\[[0-9;]*m)", text):
        m = re.fullmatch(r"\x1b\[([0-9;]*)m", part)
        if not m:
            if part:
                style = f"color:{fg or fg0};background:{bg or 'transparent'};"
                style += "font-weight:bold;" if bold else ""
                style += "text-decoration:underline;" if ul else ""
                out.append(f'<span style="{style}">{html.escape(part)}</span>')
            continue
        codes = [int(c) if c else 0 for c in m.group(1).split(";")]
        i = 0
        while i < len(codes):
            c = codes[i]
            if c == 0:
                fg, bg, bold, ul = None, None, False, False
            elif c == 1:
                bold = True
            elif c == 4:
                ul = True
            elif c in (22,):
                bold = False
            elif c == 24:
                ul = False
            elif 30 <= c <= 37:
                fg = PALETTE[c - 30]
            elif 90 <= c <= 97:
                fg = PALETTE[c - 90 + 8]
            elif 40 <= c <= 47:
                bg = PALETTE[c - 40]
            elif 100 <= c <= 107:
                bg = PALETTE[c - 100 + 8]
            elif c in (38, 48) and i + 1 < len(codes):
                if codes[i + 1] == 5 and i + 2 < len(codes):
                    col = xterm(codes[i + 2])
                    i += 2
                elif codes[i + 1] == 2 and i + 4 < len(codes):
                    col = "#%02x%02x%02x" % tuple(codes[i + 2:i + 5])
                    i += 4
                else:
                    col = None
                if c == 38:
                    fg = col
                else:
                    bg = col
            elif c == 39:
                fg = None
            elif c == 49:
                bg = None
            i += 1
    body = "".join(out)
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><style>body{{margin:0;background:{bg0}}}'
            f'pre{{font:15px/1.35 "DejaVu Sans Mono",monospace;margin:12px}}</style></head>'
            f"<body><pre>{body}</pre></body></html>")


if __name__ == "__main__":
    # usage: ansi_to_html.py [PAGE_BG [PAGE_FG]] < screen.ansi > screen.html
    colours = dict(zip(["bg0", "fg0"], sys.argv[1:3]))
    sys.stdout.write(convert(sys.stdin.read(), **colours))
