//! The manual override: `--layers "debian:0-9,gaming-pc:10-39,rack:40-79"`.
//!
//! Ranges are inclusive, as people write them; a single number is one layer. The
//! stages run in the order of their first layer, whatever order they are written in.

use std::ops::Range;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverrideError {
    #[error("no layer ranges given")]
    Empty,
    #[error("`{0}`: expected NODE:FIRST-LAST, such as rack:40-79")]
    Syntax(String),
    #[error("`{entry}`: `{number}` is not a layer number")]
    NotANumber { entry: String, number: String },
    #[error("`{0}`: the range runs backwards")]
    Backwards(String),
    #[error("unknown node `{name}` (nodes: {known})")]
    UnknownNode { name: String, known: String },
    #[error("node `{0}` is named twice")]
    DuplicateNode(String),
    #[error("`{entry}`: the model has only {layers} layers (0-{last})", last = layers - 1)]
    BeyondModel { entry: String, layers: usize },
    #[error("{overlap} given to both `{first}` and `{second}`")]
    Overlap { first: String, second: String, overlap: String },
    #[error("{0} given to no node")]
    Gap(String),
}

/// Parses and validates an override against the node names and the layer count:
/// returns (index into `nodes`, layers) in pipeline order.
pub fn parse_layers(spec: &str, nodes: &[&str], layers: usize) -> Result<Vec<(usize, Range<usize>)>, OverrideError> {
    let entries: Vec<&str> = spec.split(',').map(str::trim).filter(|e| !e.is_empty()).collect();
    if entries.is_empty() {
        return Err(OverrideError::Empty);
    }
    let mut stages: Vec<(usize, Range<usize>)> = Vec::new();
    for entry in entries {
        let (name, range) = entry.split_once(':').ok_or_else(|| OverrideError::Syntax(entry.to_string()))?;
        let (name, range) = (name.trim(), range.trim());
        let node = nodes.iter().position(|n| *n == name).ok_or_else(|| OverrideError::UnknownNode {
            name: name.to_string(),
            known: nodes.join(", "),
        })?;
        if stages.iter().any(|(n, _)| *n == node) {
            return Err(OverrideError::DuplicateNode(name.to_string()));
        }
        let number = |text: &str| {
            text.trim().parse::<usize>().map_err(|_| OverrideError::NotANumber {
                entry: entry.to_string(),
                number: text.trim().to_string(),
            })
        };
        let (first, last) = match range.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None if !range.is_empty() => (number(range)?, number(range)?),
            None => return Err(OverrideError::Syntax(entry.to_string())),
        };
        if last < first {
            return Err(OverrideError::Backwards(entry.to_string()));
        }
        if last >= layers {
            return Err(OverrideError::BeyondModel { entry: entry.to_string(), layers });
        }
        stages.push((node, first..last + 1));
    }
    stages.sort_by_key(|(_, r)| r.start);
    let mut covered = 0;
    for (i, (node, range)) in stages.iter().enumerate() {
        if range.start > covered {
            return Err(OverrideError::Gap(inclusive(covered..range.start)));
        }
        if range.start < covered {
            let previous = stages[i - 1].0;
            return Err(OverrideError::Overlap {
                first: nodes[previous].to_string(),
                second: nodes[*node].to_string(),
                overlap: inclusive(range.start..covered.min(range.end)),
            });
        }
        covered = range.end;
    }
    if covered < layers {
        return Err(OverrideError::Gap(inclusive(covered..layers)));
    }
    Ok(stages)
}

/// `layer 9` or `layers 5-9`.
fn inclusive(range: Range<usize>) -> String {
    if range.len() == 1 {
        format!("layer {}", range.start)
    } else {
        format!("layers {}-{}", range.start, range.end - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &[&str] = &["debian", "gaming-pc", "rack"];

    #[test]
    fn a_valid_override_in_any_order() {
        let stages = parse_layers("rack:40-79, debian:0-9,gaming-pc:10-39", NODES, 80).unwrap();
        assert_eq!(stages, vec![(0, 0..10), (1, 10..40), (2, 40..80)]);
        assert_eq!(parse_layers("rack:0,debian:1-1", NODES, 2).unwrap(), vec![(2, 0..1), (0, 1..2)]);
    }

    #[test]
    fn every_mistake_gets_its_own_message() {
        let err = |spec| parse_layers(spec, NODES, 80).unwrap_err().to_string();
        assert_eq!(err(""), "no layer ranges given");
        assert_eq!(err("debian 0-9"), "`debian 0-9`: expected NODE:FIRST-LAST, such as rack:40-79");
        assert_eq!(err("debian:"), "`debian:`: expected NODE:FIRST-LAST, such as rack:40-79");
        assert_eq!(err("debian:0-x"), "`debian:0-x`: `x` is not a layer number");
        assert_eq!(err("debian:9-0"), "`debian:9-0`: the range runs backwards");
        assert_eq!(err("laptop:0-79"), "unknown node `laptop` (nodes: debian, gaming-pc, rack)");
        assert_eq!(err("debian:0-9,debian:10-79"), "node `debian` is named twice");
        assert_eq!(err("debian:0-80"), "`debian:0-80`: the model has only 80 layers (0-79)");
        assert_eq!(err("debian:0-9,rack:5-79"), "layers 5-9 given to both `debian` and `rack`");
        assert_eq!(err("debian:0-9,rack:9-79"), "layer 9 given to both `debian` and `rack`");
        assert_eq!(err("debian:0-9,rack:20-79"), "layers 10-19 given to no node");
        assert_eq!(err("debian:1-79"), "layer 0 given to no node");
        assert_eq!(err("debian:0-9,rack:10-70"), "layers 71-79 given to no node");
    }
}
