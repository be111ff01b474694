//! The scenarios: what each one calls, on which server, over which protocol,
//! and the target it is held to relative to another scenario.
//!
//! Adding a scenario is one entry in [`SCENARIOS`]. A scenario that calls a
//! new RPC also needs a variant of [`Rpc`](crate::calls::Rpc) (its path,
//! request and response); one against a new kind of server a variant of
//! [`ServerKind`](crate::servers::ServerKind). The table is run in order, so a
//! reference must come before the scenarios that compare themselves to it.

use crate::calls::{Protocol, Rpc};
use crate::servers::ServerKind;

/// One measured call path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scenario {
    /// Short name: `--scenario` value and file name in the output directory.
    pub name: &'static str,
    /// One line for the report.
    pub about: &'static str,
    pub server: ServerKind,
    pub protocol: Protocol,
    pub rpc: Rpc,
    /// What it is held to; `None` for a reference scenario.
    pub target: Option<Target>,
}

/// A scenario's goal, as ratios to its reference scenario's results.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    /// Name of the scenario compared against (run first, in the same run).
    pub reference: &'static str,
    /// Requests/s must be at least this fraction of the reference's.
    pub min_rps_ratio: f64,
    /// p99 latency must be at most this multiple of the reference's.
    pub max_p99_ratio: Option<f64>,
}

/// Every scenario, in run order.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "baseline",
        about: "bare tonic server (no layers), same SystemService.GetInfo handler, native gRPC",
        server: ServerKind::Baseline,
        protocol: Protocol::Grpc,
        rpc: Rpc::SystemGetInfo,
        target: None,
    },
    Scenario {
        name: "mesh-noop",
        about: "trellisd SystemService.GetInfo through the full layer stack, native gRPC",
        server: ServerKind::Trellisd,
        protocol: Protocol::Grpc,
        rpc: Rpc::SystemGetInfo,
        target: Some(Target {
            reference: "baseline",
            min_rps_ratio: 0.85,
            max_p99_ratio: Some(1.3),
        }),
    },
    Scenario {
        name: "grpc-web",
        about: "trellisd SystemService.GetInfo over gRPC-web on HTTP/1.1 (one keep-alive connection per task)",
        server: ServerKind::Trellisd,
        protocol: Protocol::GrpcWeb,
        rpc: Rpc::SystemGetInfo,
        target: Some(Target {
            reference: "mesh-noop",
            min_rps_ratio: 0.95,
            max_p99_ratio: None,
        }),
    },
];

/// Looks a scenario up by name.
pub fn by_name(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// The scenarios to run for the names asked for (all when none), with the
/// references they compare against added, in table order.
pub fn select(names: &[String]) -> anyhow::Result<Vec<&'static Scenario>> {
    if names.is_empty() {
        return Ok(SCENARIOS.iter().collect());
    }
    let mut wanted: Vec<&'static str> = Vec::new();
    for name in names {
        let mut next = Some(by_name(name).ok_or_else(|| {
            anyhow::anyhow!(
                "unknown scenario '{name}' (known: {})",
                SCENARIOS
                    .iter()
                    .map(|s| s.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?);
        // A scenario's reference (and its reference's) runs too, so every
        // ratio in the report is measured in the same run.
        while let Some(s) = next {
            if !wanted.contains(&s.name) {
                wanted.push(s.name);
            }
            next = s.target.and_then(|t| by_name(t.reference));
        }
    }
    Ok(SCENARIOS
        .iter()
        .filter(|s| wanted.contains(&s.name))
        .collect())
}

impl Target {
    /// The target as the report states it.
    pub fn text(&self) -> String {
        let mut text = format!("≥ {}× {} req/s", self.min_rps_ratio, self.reference);
        if let Some(p99) = self.max_p99_ratio {
            text.push_str(&format!(" and p99 ≤ {p99}× {} p99", self.reference));
        }
        text
    }

    /// Whether results with these ratios to the reference meet the target.
    pub fn met(&self, rps_ratio: f64, p99_ratio: f64) -> bool {
        rps_ratio >= self.min_rps_ratio && self.max_p99_ratio.is_none_or(|max| p99_ratio <= max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_references_run_first() {
        for (i, s) in SCENARIOS.iter().enumerate() {
            assert_eq!(
                SCENARIOS.iter().filter(|o| o.name == s.name).count(),
                1,
                "{} is listed once",
                s.name
            );
            if let Some(t) = s.target {
                let r = SCENARIOS
                    .iter()
                    .position(|o| o.name == t.reference)
                    .expect("reference exists");
                assert!(
                    r < i,
                    "{}'s reference {} runs before it",
                    s.name,
                    t.reference
                );
            }
        }
    }

    #[test]
    fn selecting_a_scenario_brings_its_references() {
        let names: Vec<_> = select(&["grpc-web".to_string()])
            .expect("known")
            .iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["baseline", "mesh-noop", "grpc-web"]);
        assert!(select(&["nope".to_string()]).is_err());
    }

    #[test]
    fn targets() {
        let t = Target {
            reference: "baseline",
            min_rps_ratio: 0.85,
            max_p99_ratio: Some(1.3),
        };
        assert!(t.met(0.9, 1.2));
        assert!(!t.met(0.8, 1.2));
        assert!(!t.met(0.9, 1.4));
        assert_eq!(
            t.text(),
            "≥ 0.85× baseline req/s and p99 ≤ 1.3× baseline p99"
        );
    }
}
