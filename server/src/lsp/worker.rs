//! Model work runs on one dedicated thread that owns the model (loaded lazily, one at a time);
//! handlers send it jobs and await the reply, so no handler future ever runs the model.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use tokio::sync::{mpsc as tokio_mpsc, oneshot};

use salience_core::analysis::{analyse, Analysis, AnalysisOptions, Target};
use salience_core::faithfulness::{self, Faithfulness, FaithfulnessOptions};
use salience_core::prompt_file::PromptFile;
use salience_core::segments::Segmentation;
use salience_engine::generate::GenerateOptions;
use salience_engine::prompt::TemplateMode;
use salience_engine::registry::FetchOptions;
use salience_engine::{CancelToken, Engine, EngineError, Progress};

pub enum Task {
    Analyse {
        file: PromptFile,
        target: Target,
        options: Box<AnalysisOptions>,
    },
    Generate {
        file: PromptFile,
        template: Option<TemplateMode>,
        system: Option<String>,
        generation: GenerateOptions,
    },
    /// The deletion test of a painted map at one level.
    Faithfulness {
        analysis: Arc<Analysis>,
        segmentation: Segmentation,
    },
}

pub enum Output {
    Analysis(Box<Analysis>),
    /// The response, and the seed when it was sampled.
    Generated(String, Option<u64>),
    Faithfulness(Box<Faithfulness>),
}

/// The most model jobs waiting or running at once; more are refused (a compute on a document
/// cancels the one before it, so only many documents, or a misbehaving client, reach this).
pub const MAX_QUEUED: usize = 16;

/// A place in the worker's queue, given back when the job is done with (run, skipped or
/// dropped).
struct QueueSlot(Arc<AtomicUsize>);

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Job {
    _slot: QueueSlot,
    pub model: String,
    pub fetch: FetchOptions,
    pub task: Task,
    pub cancel: CancelToken,
    pub progress: Option<tokio_mpsc::UnboundedSender<Progress>>,
    pub reply: oneshot::Sender<Result<Output, EngineError>>,
}

#[derive(Clone)]
pub struct Worker {
    tx: mpsc::Sender<Job>,
    queued: Arc<AtomicUsize>,
}

impl Worker {
    pub fn spawn() -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("prompt-salience-model".into())
            .spawn(move || {
                let mut loaded: Option<(String, Engine)> = None;
                for job in rx {
                    let Job {
                        _slot,
                        model,
                        fetch,
                        task,
                        cancel,
                        progress,
                        reply,
                    } = job;
                    if cancel.is_cancelled() {
                        let _ = reply.send(Err(EngineError::Cancelled));
                        continue;
                    }
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run(&mut loaded, &model, &fetch, task, &cancel, progress)
                    }))
                    .unwrap_or_else(|p| {
                        let msg = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "unknown panic".into());
                        tracing::error!("model worker panicked: {msg}");
                        Err(EngineError::Compute(format!("internal error: {msg}")))
                    });
                    let _ = reply.send(result);
                }
            })
            .expect("spawn model worker");
        Self {
            tx,
            queued: Arc::default(),
        }
    }

    pub async fn submit(
        &self,
        model: String,
        fetch: FetchOptions,
        task: Task,
        cancel: CancelToken,
        progress: Option<tokio_mpsc::UnboundedSender<Progress>>,
    ) -> Result<Output, EngineError> {
        if self.queued.fetch_add(1, Ordering::SeqCst) >= MAX_QUEUED {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Compute(format!(
                "the server is busy: {MAX_QUEUED} model jobs are waiting; try again when they finish"
            )));
        }
        let slot = QueueSlot(self.queued.clone());
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                _slot: slot,
                model,
                fetch,
                task,
                cancel,
                progress,
                reply,
            })
            .map_err(|_| EngineError::Compute("the model worker stopped".into()))?;
        rx.await
            .map_err(|_| EngineError::Compute("the model worker stopped".into()))?
    }
}

fn run(
    loaded: &mut Option<(String, Engine)>,
    model: &str,
    fetch: &FetchOptions,
    task: Task,
    cancel: &CancelToken,
    progress: Option<tokio_mpsc::UnboundedSender<Progress>>,
) -> Result<Output, EngineError> {
    if loaded.as_ref().is_none_or(|(name, _)| name != model) {
        *loaded = None; // one model in memory at a time
        tracing::info!("loading model {model}");
        *loaded = Some((model.to_string(), Engine::load_named(model, fetch)?));
    }
    let engine = &loaded.as_ref().expect("loaded").1;
    let report = move |p: Progress| {
        if let Some(tx) = &progress {
            let _ = tx.send(p);
        }
    };
    match task {
        Task::Analyse {
            file,
            target,
            options,
        } => analyse(engine, &file, &target, &options, &report, cancel)
            .map(|a| Output::Analysis(Box::new(a))),
        Task::Generate {
            file,
            template,
            system,
            generation,
        } => {
            let template = engine.template_or_default(template);
            let prepared = engine.prepare(file.prompt_text(), system.as_deref(), template)?;
            let gen = engine.generate(&prepared.ids(), &generation, &report, cancel)?;
            Ok(Output::Generated(gen.text, gen.seed))
        }
        Task::Faithfulness {
            analysis,
            segmentation,
        } => faithfulness::check(
            engine,
            &analysis,
            &segmentation,
            &FaithfulnessOptions::default(),
            &report,
            cancel,
        )
        .map(|f| Output::Faithfulness(Box::new(f))),
    }
}
