//! The arithmetic a salience request asks for (`model::Flops`), pass by pass as `compute`
//! runs them: what `bench` reads its times against.

use super::{Baseline, Method, SalienceRequest};
use crate::model::{Flops, LayerPass, Model};

/// The floating-point operations of `req` on `model`, where the passes are known beforehand:
/// gradient salience, and integrated gradients with a fixed rule. None for adaptive
/// integrated gradients, whose passes depend on what they find, and for perturbation.
pub fn flops(model: &Model, req: &SalienceRequest) -> Option<Flops> {
    let ts = req.target.start;
    if ts == 0 {
        return None;
    }
    // One term per objective: the target, and the contrast's tokens after the same context.
    let mut targets = vec![req.target.len()];
    targets.extend(req.contrast.as_ref().map(Vec::len));
    // A pass over the positions predicting `n` tokens from `ts` (`Scored`).
    let pass = |n: usize, batch: usize, backward: bool| {
        let layers = model.layer_flops(&LayerPass {
            batch,
            positions: ts - 1 + n,
            past: 0,
            outputs_from: ts - 1,
            backward,
        });
        layers + model.head_flops(batch * n, backward)
    };
    let gradients = |steps: f64| {
        targets
            .iter()
            .fold(Flops::default(), |f, &n| f + pass(n, 1, true) * steps)
    };
    match req.method {
        Method::GradL2 | Method::GradDotInput => Some(gradients(1.0)),
        Method::IntegratedGradients => {
            let steps = req.ig.fixed_steps?;
            let rule = req.ig.spacing.rule(steps.max(1)).len() as f64;
            let shortcut = req.ig.baseline == Baseline::Zero && model.keeps_zeros();
            let ends = targets.iter().fold(Flops::default(), |f, &n| {
                // F at the input, and at the baseline: in the same batch, or (zero baseline)
                // the target's positions alone after the context's zero keys.
                let at_baseline = match (shortcut, n) {
                    (false, _) => pass(n, 1, false),
                    (true, 1) => model.head_flops(1, false),
                    (true, _) => {
                        let after_zeros = model.layer_flops(&LayerPass {
                            batch: 1,
                            positions: n - 1,
                            past: ts,
                            outputs_from: 0,
                            backward: false,
                        });
                        after_zeros + model.head_flops(n, false)
                    }
                };
                f + pass(n, 1, false) + at_baseline
            });
            Some(gradients(rule) + ends)
        }
        Method::LeaveOneOut | Method::AblationSurrogate => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::arch::Arch;
    use crate::model::ModelConfig;
    use crate::salience::{IgOptions, Spacing};

    fn request(method: Method, fixed_steps: Option<usize>) -> SalienceRequest {
        SalienceRequest {
            ids: (0..40).collect(),
            target: 30..35,
            method,
            ig: IgOptions {
                baseline: Baseline::Zero,
                spacing: Spacing::Uniform,
                fixed_steps,
                ..IgOptions::default()
            },
            pad_id: None,
            contrast: None,
        }
    }

    #[test]
    fn a_request_counts_its_passes() {
        let cfg = ModelConfig::plain(Arch::Llama, 2, 32, (4, 2, 8), 48, 50, 10000.0, 256);
        let model = Model::random(cfg, 3).unwrap();
        assert!(model.keeps_zeros());
        // The 5 target tokens are predicted by positions 29..34: 34 positions, outputs from 29.
        let layers = |positions, past, from, backward| {
            model.layer_flops(&LayerPass {
                batch: 1,
                positions,
                past,
                outputs_from: from,
                backward,
            })
        };
        let gradient = layers(34, 0, 29, true) + model.head_flops(5, true);
        let grad = flops(&model, &request(Method::GradDotInput, None)).unwrap();
        assert_eq!(grad, gradient);
        assert_eq!(
            flops(&model, &request(Method::GradL2, None)),
            Some(gradient)
        );

        // 8 steps, F at the input, and F at the zero baseline from the target's 4 first
        // positions after 30 zero keys.
        let ig = flops(&model, &request(Method::IntegratedGradients, Some(8))).unwrap();
        let ends = layers(34, 0, 29, false)
            + model.head_flops(5, false)
            + layers(4, 30, 0, false)
            + model.head_flops(5, false);
        let want = gradient * 8.0 + ends;
        assert!((ig.total() - want.total()).abs() <= 1e-9 * want.total());

        // A contrast adds its own passes.
        let mut contrast = request(Method::GradDotInput, None);
        contrast.contrast = Some(vec![1, 2]);
        let with = flops(&model, &contrast).unwrap();
        let second = layers(31, 0, 29, true) + model.head_flops(2, true);
        assert_eq!(with, gradient + second);

        assert_eq!(
            flops(&model, &request(Method::IntegratedGradients, None)),
            None
        );
        assert_eq!(flops(&model, &request(Method::LeaveOneOut, None)), None);
    }
}
