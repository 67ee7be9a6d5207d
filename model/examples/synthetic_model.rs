//! Writes a random-weight model into a folder and prints its path:
//! `cargo run --example synthetic_model -- DIR`. Four layers, hidden 64
//! (`SyntheticModel::tiny`): a pipeline over it spends its time moving frames, not
//! computing, which is what `scripts/bench-tls` needs to see the transport's own cost.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: synthetic_model DIR")?;
    std::fs::create_dir_all(&dir)?;
    let path = strata_model::synthetic::SyntheticModel::tiny().write_to(std::path::Path::new(&dir))?;
    println!("{}", path.display());
    Ok(())
}
