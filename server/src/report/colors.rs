//! Heat-coloured text for terminals (24-bit colour backgrounds).

use std::fmt::Write;

/// Background colour for a normalized score in [-1, 1]: green raises the target, red lowers
/// it; unsigned scores use one blue hue.
pub fn heat_rgb(norm: f32, signed: bool) -> (u8, u8, u8) {
    let a = norm.abs().clamp(0.0, 1.0);
    let (r, g, b) = if !signed {
        (40.0, 110.0, 220.0)
    } else if norm >= 0.0 {
        (30.0, 160.0, 70.0)
    } else {
        (210.0, 50.0, 50.0)
    };
    let mix = |c: f32| (255.0 + (c - 255.0) * a).round() as u8;
    (mix(r), mix(g), mix(b))
}

/// Renders pieces of text with a heat colour each; `None` pieces are printed plain.
pub fn render(pieces: &[(String, Option<f32>)], signed: bool) -> String {
    let mut out = String::new();
    for (text, norm) in pieces {
        match norm {
            Some(n) => {
                let (r, g, b) = heat_rgb(*n, signed);
                // Keep newlines outside the coloured run so backgrounds don't bleed.
                for (i, line) in text.split('\n').enumerate() {
                    if i > 0 {
                        out.push('\n');
                    }
                    if !line.is_empty() {
                        let _ = write!(out, "\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{line}\x1b[0m");
                    }
                }
            }
            None => out.push_str(text),
        }
    }
    out
}

pub fn legend(signed: bool) -> String {
    let mut out = String::from("legend: ");
    let stops: &[f32] = if signed {
        &[-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0]
    } else {
        &[0.0, 0.25, 0.5, 0.75, 1.0]
    };
    for &s in stops {
        let (r, g, b) = heat_rgb(s, signed);
        let _ = write!(
            out,
            "\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m {s:+.2} \x1b[0m"
        );
    }
    if signed {
        out.push_str("  (green raises the target's probability, red lowers it)");
    } else {
        out.push_str("  (gradient magnitude, unsigned)");
    }
    out
}
