//! Letting other machines reach a program's port through the Windows firewall, as a
//! service installer does; removing the rule again on uninstall.
//!
//! The rules go through `netsh advfirewall`, which every Windows since Vista has.
//! They allow inbound traffic for one program and port on private and domain
//! networks only: a home network marked "Public" stays closed (the user marks it
//! Private, which Windows asks when it first joins one).

use std::path::Path;

/// TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// One inbound rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundRule<'a> {
    /// Shared by all of a program's rules, so they are removed together.
    pub name: &'a str,
    pub program: &'a Path,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("cannot run netsh: {0}")]
    Run(std::io::Error),
    #[error("netsh {action} failed: {output}")]
    Refused { action: &'static str, output: String },
    #[error("firewall rules are set only on Windows")]
    NotWindows,
}

impl InboundRule<'_> {
    /// netsh's arguments to add the rule.
    pub fn add_arguments(&self) -> Vec<String> {
        let protocol = match self.protocol {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        };
        vec![
            "advfirewall".into(),
            "firewall".into(),
            "add".into(),
            "rule".into(),
            format!("name={}", self.name),
            "dir=in".into(),
            "action=allow".into(),
            format!("program={}", self.program.display()),
            format!("protocol={protocol}"),
            format!("localport={}", self.port),
            "profile=private,domain".into(),
            "enable=yes".into(),
        ]
    }
}

/// netsh's arguments to remove every rule called `name`.
pub fn delete_arguments(name: &str) -> Vec<String> {
    ["advfirewall", "firewall", "delete", "rule"].iter().map(|s| s.to_string()).chain([format!("name={name}")]).collect()
}

/// Adds `rule` (needs an administrator's rights, as installing a service does).
pub fn allow_inbound(rule: &InboundRule<'_>) -> Result<(), FirewallError> {
    netsh("add rule", &rule.add_arguments())
}

/// Removes every rule called `name`.
pub fn remove(name: &str) -> Result<(), FirewallError> {
    netsh("delete rule", &delete_arguments(name))
}

#[cfg(windows)]
fn netsh(action: &'static str, args: &[String]) -> Result<(), FirewallError> {
    let output = std::process::Command::new("netsh").args(args).output().map_err(FirewallError::Run)?;
    if output.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&output.stdout).trim().to_string() + String::from_utf8_lossy(&output.stderr).trim();
    Err(FirewallError::Refused { action, output: text.lines().next().unwrap_or("no output").to_string() })
}

#[cfg(not(windows))]
fn netsh(_action: &'static str, _args: &[String]) -> Result<(), FirewallError> {
    Err(FirewallError::NotWindows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_opens_one_program_s_port_on_private_networks() {
        let rule = InboundRule {
            name: "strata-worker",
            program: Path::new(r"C:\Program Files\strata\strata-worker.exe"),
            protocol: Protocol::Tcp,
            port: 7070,
        };
        let args = rule.add_arguments();
        assert_eq!(args[..4], ["advfirewall", "firewall", "add", "rule"]);
        for expected in [
            "name=strata-worker",
            "dir=in",
            "action=allow",
            r"program=C:\Program Files\strata\strata-worker.exe",
            "protocol=TCP",
            "localport=7070",
            "profile=private,domain",
        ] {
            assert!(args.iter().any(|a| a == expected), "{expected} missing from {args:?}");
        }
        assert_eq!(delete_arguments("strata-worker"), ["advfirewall", "firewall", "delete", "rule", "name=strata-worker"]);
    }
}
