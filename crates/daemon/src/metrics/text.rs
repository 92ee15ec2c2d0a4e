//! The exposition formats. `prometheus-client` writes OpenMetrics text; Prometheus' own
//! text format (0.0.4, what `promtool check metrics` and older scrapers read) differs in a
//! few marks only: a counter's family is named with its `_total`, and there are no `# UNIT`
//! lines, no `_created` samples and no `# EOF`.

use std::collections::HashSet;

pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a scraper's `Accept` header asks for OpenMetrics.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

fn sample_name(line: &str) -> &str {
    let end = line.find(['{', ' ']).unwrap_or(line.len());
    &line[..end]
}

/// OpenMetrics text as Prometheus text 0.0.4.
pub fn to_prometheus(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let described = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match described {
            Some((prefix, rest)) => {
                let name = rest.split(' ').next().unwrap_or("");
                if counters.contains(name) {
                    out.push_str(prefix);
                    out.push_str(name);
                    out.push_str("_total");
                    out.push_str(&rest[name.len()..]);
                } else {
                    out.push_str(line);
                }
            }
            None => {
                let name = sample_name(line);
                let created = name
                    .strip_suffix("_created")
                    .is_some_and(|family| counters.contains(family));
                if created {
                    continue;
                }
                out.push_str(line);
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_take_their_total_and_openmetrics_marks_go() {
        let om = "# HELP a_requests API requests.\n# TYPE a_requests counter\na_requests_total{route=\"/x\"} 3\na_requests_created{route=\"/x\"} 1.5\n\
# HELP a_latency_seconds Latency.\n# TYPE a_latency_seconds histogram\n# UNIT a_latency_seconds seconds\na_latency_seconds_sum 0.5\na_latency_seconds_count 2\na_latency_seconds_bucket{le=\"+Inf\"} 2\n\
# HELP a_leases Leases.\n# TYPE a_leases gauge\na_leases{egress=\"acme\"} 2\n# EOF\n";
        let text = to_prometheus(om);
        assert_eq!(
            text,
            "# HELP a_requests_total API requests.\n# TYPE a_requests_total counter\na_requests_total{route=\"/x\"} 3\n\
# HELP a_latency_seconds Latency.\n# TYPE a_latency_seconds histogram\na_latency_seconds_sum 0.5\na_latency_seconds_count 2\na_latency_seconds_bucket{le=\"+Inf\"} 2\n\
# HELP a_leases Leases.\n# TYPE a_leases gauge\na_leases{egress=\"acme\"} 2\n"
        );
    }

    #[test]
    fn openmetrics_is_asked_for_by_accept() {
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(None));
    }
}
