//! Finding and dialling node agents. The agents are the pods matching `--agent-selector` in
//! the controller's namespace; a Ready pod on node N is dialled at `status.podIP` and its
//! container port named `grpc` (7443 when unnamed). The TLS handshake checks that the peer's
//! certificate carries `node:<N>`, so a pod that claims the wrong node cannot receive orders.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

/// Port used when no container port is named `grpc`.
pub const DEFAULT_GRPC_PORT: i32 = 7443;

/// Node name → `ip:port` of its Ready agent. With several Ready agents on one node (a rollout)
/// the newest by name wins; either would do, orders are idempotent per agent.
pub fn endpoints(pods: &[Pod]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut pods: Vec<&Pod> = pods.iter().collect();
    pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    for pod in pods {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let (Some(spec), Some(status)) = (&pod.spec, &pod.status) else { continue };
        let Some(node) = spec.node_name.clone().filter(|n| !n.is_empty()) else { continue };
        let ready = status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
        let Some(ip) = status.pod_ip.clone().filter(|ip| !ip.is_empty()) else { continue };
        if !ready {
            continue;
        }
        let port = spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some("grpc"))
            .map_or(DEFAULT_GRPC_PORT, |p| p.container_port);
        let host = if ip.contains(':') { format!("[{ip}]") } else { ip };
        out.insert(node, format!("{host}:{port}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn agent(name: &str, node: &str, ip: &str, ready: bool, port: Option<i32>) -> Pod {
        let ports = port.map(|p| json!([{"name": "grpc", "containerPort": p}])).unwrap_or(json!([]));
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"nodeName": node, "containers": [{"name": "agent", "image": "x", "ports": ports}]},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        }))
        .expect("pod")
    }

    #[test]
    fn ready_agents_by_node() {
        let pods = [
            agent("a-1", "n1", "10.0.0.1", true, Some(9000)),
            agent("a-2", "n2", "10.0.0.2", false, None),
            agent("a-3", "n3", "fd00::3", true, None),
        ];
        let e = endpoints(&pods);
        assert_eq!(e.get("n1").map(String::as_str), Some("10.0.0.1:9000"));
        assert_eq!(e.get("n2"), None);
        assert_eq!(e.get("n3").map(String::as_str), Some("[fd00::3]:7443"));
    }
}
