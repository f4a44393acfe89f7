//! cairn: the [`Target`] for cairn's REST API. A put registers instance `i-NNNNNN` of service
//! `bench-<prefix>` (`PUT /v1/services/{service}/instances/{id}`, the 256-byte body); a get
//! reads it back (`GET` of the same path, linearizable by default); a query lists service
//! `bench-q-<prefix>`, into which the preload registered exactly ten instances.

use reqwest::header::CONTENT_TYPE;

use super::http::{send, HttpPool, OpError};
use super::target::{record_body, Target};
use super::workload::key_name;

/// cairn over HTTPS mTLS.
pub struct CairnTarget {
    pool: HttpPool,
    service: String,
    group: String,
    body: Vec<u8>,
}

impl CairnTarget {
    /// A target whose services are named after `prefix` (a DNS label fragment).
    pub fn new(pool: HttpPool, prefix: &str) -> CairnTarget {
        CairnTarget {
            pool,
            service: format!("bench-{prefix}"),
            group: format!("bench-q-{prefix}"),
            body: record_body(),
        }
    }

    fn instance_url(&self, base: &str, service: &str, key: u64) -> String {
        format!("{base}/v1/services/{service}/instances/{}", key_name(key))
    }

    async fn register(&self, client: usize, service: &str, key: u64) -> Result<(), OpError> {
        let (http, base) = self.pool.conn(client);
        let req = http
            .put(self.instance_url(base, service, key))
            .header(CONTENT_TYPE, "application/json")
            .body(self.body.clone());
        send(req).await.map(drop)
    }
}

impl Target for CairnTarget {
    fn name(&self) -> &'static str {
        "cairn"
    }

    async fn put(&self, client: usize, key: u64) -> Result<(), OpError> {
        self.register(client, &self.service, key).await
    }

    async fn get(&self, client: usize, key: u64) -> Result<(), OpError> {
        let (http, base) = self.pool.conn(client);
        send(http.get(self.instance_url(base, &self.service, key)))
            .await
            .map(drop)
    }

    async fn query(&self, client: usize) -> Result<usize, OpError> {
        let (http, base) = self.pool.conn(client);
        let body = send(http.get(format!("{base}/v1/services/{}", self.group))).await?;
        count_instances(body.as_ref())
    }

    async fn put_group_member(&self, client: usize, member: u64) -> Result<(), OpError> {
        self.register(client, &self.group, member).await
    }
}

/// Counts the instances of a query answer: `{"instances": [...]}` (cairn's shape:
/// `{"service", "index", "instances"}`) or a bare top-level array.
pub fn count_instances(body: &[u8]) -> Result<usize, OpError> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|_| OpError::BadBody)?;
    let list = match &v {
        serde_json::Value::Array(a) => Some(a),
        serde_json::Value::Object(o) => o.get("instances").and_then(|i| i.as_array()),
        _ => None,
    };
    list.map(Vec::len).ok_or(OpError::BadBody)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_either_shape() {
        let obj = br#"{"service":"bench-q-x","index":7,"instances":[{"id":"a"},{"id":"b"}]}"#;
        assert_eq!(count_instances(obj), Ok(2));
        assert_eq!(count_instances(br#"[{},{},{}]"#), Ok(3));
        assert_eq!(count_instances(br#"{"items":[]}"#), Err(OpError::BadBody));
        assert_eq!(count_instances(b"not json"), Err(OpError::BadBody));
    }

    #[test]
    fn urls() {
        let pool = HttpPool::new(
            &["http://127.0.0.1:1/".to_string()],
            None,
            1,
            std::time::Duration::from_secs(1),
        )
        .expect("pool");
        let t = CairnTarget::new(pool, "ab12");
        assert_eq!(
            t.instance_url("https://h:7400", &t.service, 42),
            "https://h:7400/v1/services/bench-ab12/instances/i-000042"
        );
        assert_eq!(t.group, "bench-q-ab12");
    }
}
