//! Who may join the cluster: `--state-dir` and `--insecure` of `strata serve`, and
//! `strata token`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use strata_trust::{Authority, JoinToken, Transport};

#[derive(Debug, Clone, Args)]
pub struct TrustArgs {
    /// Where the coordinator keeps the cluster's certificate authority, the join
    /// token's secret and the nodes it enrolled or revoked (default: the user data
    /// folder/strata/coordinator). Made on first start.
    #[arg(long, env = "STRATA_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Plain TCP between the nodes, no token, no certificates: anyone on the network
    /// can join, read prompts and steer workers. For a quick trial on a network you
    /// trust; the workers must be started with --insecure too.
    #[arg(long, env = "STRATA_INSECURE")]
    pub insecure: bool,
}

impl TrustArgs {
    pub fn state_dir(&self) -> anyhow::Result<PathBuf> {
        match &self.state_dir {
            Some(dir) => Ok(dir.clone()),
            None => strata_platform::paths::user_data()
                .map(|d| d.join("coordinator"))
                .context("cannot determine a data folder; pass --state-dir"),
        }
    }

    /// Sets this process's transport: mutual TLS under the cluster's CA (made now
    /// if this is the first start), or plain TCP with --insecure. The join token,
    /// unless insecure.
    pub fn install(&self) -> anyhow::Result<Option<JoinToken>> {
        if self.insecure {
            tracing::warn!(
                "--insecure: plain TCP between the nodes; anyone who can reach the gRPC port can join, read prompts \
                 and steer workers"
            );
            strata_trust::install(Transport::Insecure)?;
            return Ok(None);
        }
        let dir = self.state_dir()?;
        let authority =
            Arc::new(Authority::open_or_create(&dir).with_context(|| format!("state folder {}", dir.display()))?);
        let token = authority.token().clone();
        strata_trust::install(Transport::coordinator(authority)?)?;
        Ok(Some(token))
    }
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[arg(long, env = "STRATA_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// `strata token`: the join token of the coordinator whose state is in
/// `--state-dir` (its CA made now if there is none yet, so workers can be started
/// before the coordinator).
pub fn token(args: TokenArgs) -> anyhow::Result<()> {
    let dir = TrustArgs { state_dir: args.state_dir, insecure: false }.state_dir()?;
    let authority = Authority::open_or_create(&dir).with_context(|| format!("state folder {}", dir.display()))?;
    println!("{}", authority.token());
    Ok(())
}
