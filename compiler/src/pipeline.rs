//! The pipeline: every pass in the order it runs, fusion strategies, and the runner that verifies and
//! reports after each pass.

use std::time::{Duration, Instant};

use q3c_ir::Graph;

use crate::passes::{moe_route, norm_rope, qkv, residual_norm, swiglu, Pass};

/// Every pass, in pipeline order. A strategy runs a subset, always in this order. `swiglu` claims the
/// gate/up pair before `qkv` groups the linears that share an input.
pub const PASSES: [Pass; 5] = [
    norm_rope::PASS,
    swiglu::PASS,
    residual_norm::PASS,
    qkv::PASS,
    moe_route::PASS,
];

/// Which passes to run: `none`, `all`, or a comma list of pass names.
#[derive(Clone, Debug)]
pub struct Strategy {
    name: String,
    passes: Vec<Pass>,
}

/// A strategy or pipeline run that cannot be carried out.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("unknown fusion pass '{0}' (available: {avail}; or none, all)", avail = available())]
    UnknownPass(String),
    #[error("pass {pass} broke the graph (a q3c bug): {errors}")]
    Broken {
        pass: &'static str,
        errors: q3c_ir::VerifierErrors,
    },
}

fn available() -> String {
    PASSES.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
}

impl Strategy {
    /// No fusion.
    pub fn none() -> Strategy {
        Strategy {
            name: "none".into(),
            passes: vec![],
        }
    }

    /// Parses `none`, `all`, or `pass1,pass2`.
    pub fn parse(text: &str) -> Result<Strategy, PipelineError> {
        match text.trim() {
            "none" | "" => Ok(Strategy::none()),
            "all" => Ok(Strategy {
                name: "all".into(),
                passes: PASSES.to_vec(),
            }),
            list => {
                let wanted: Vec<&str> = list.split(',').map(str::trim).collect();
                if let Some(bad) = wanted
                    .iter()
                    .find(|w| !PASSES.iter().any(|p| p.name == **w))
                {
                    return Err(PipelineError::UnknownPass(bad.to_string()));
                }
                let passes: Vec<Pass> = PASSES
                    .iter()
                    .filter(|p| wanted.contains(&p.name))
                    .copied()
                    .collect();
                let name = passes.iter().map(|p| p.name).collect::<Vec<_>>().join(",");
                Ok(Strategy { name, passes })
            }
        }
    }

    /// The canonical name (`none`, `all`, or the passes in pipeline order), as recorded in manifests.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn passes(&self) -> &[Pass] {
        &self.passes
    }
}

/// What one pass did.
#[derive(Clone, Debug)]
pub struct PassReport {
    pub pass: &'static str,
    pub rewrites: usize,
    pub nodes_after: usize,
    pub elapsed: Duration,
}

/// Runs the strategy's passes in pipeline order. After each pass the graph is verified (always in debug and
/// test builds, and when `verify` is set) and `after` sees the report and the graph.
pub fn run(
    graph: &mut Graph,
    strategy: &Strategy,
    verify: bool,
    mut after: impl FnMut(&PassReport, &Graph),
) -> Result<Vec<PassReport>, PipelineError> {
    let mut reports = Vec::new();
    for pass in strategy.passes() {
        let start = Instant::now();
        let rewrites = (pass.run)(graph);
        let report = PassReport {
            pass: pass.name,
            rewrites,
            nodes_after: graph.len(),
            elapsed: start.elapsed(),
        };
        if verify || cfg!(debug_assertions) {
            q3c_ir::verify(graph).map_err(|errors| PipelineError::Broken {
                pass: pass.name,
                errors,
            })?;
        }
        after(&report, graph);
        reports.push(report);
    }
    Ok(reports)
}
