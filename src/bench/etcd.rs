//! etcd: the [`Target`] for etcd v3 through its JSON gRPC gateway. A put is
//! `POST /v3/kv/put {"key","value"}` of `/bench/<prefix>/i-NNNNNN` with the same 256 bytes
//! cairn gets as its body; a get is `POST /v3/kv/range {"key"}` (linearizable: the gateway's
//! default, `serializable` is never set); a query ranges over `/bench-q/<prefix>/`, which
//! the preload filled with ten keys. Keys and values travel base64-encoded.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::http::{send, HttpPool, OpError};
use super::target::{record_body, Target};
use super::workload::key_name;

/// etcd over HTTPS mTLS.
pub struct EtcdTarget {
    pool: HttpPool,
    data_prefix: String,
    group_prefix: String,
    value_b64: String,
    group_range: RangeRequest,
}

#[derive(Serialize)]
struct PutRequest<'a> {
    key: String,
    value: &'a str,
}

#[derive(Serialize, Clone)]
struct RangeRequest {
    key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    range_end: Option<String>,
}

/// The part of a range answer the bench reads. The gateway leaves `kvs` out when it is empty.
#[derive(Deserialize)]
struct RangeResponse {
    #[serde(default)]
    kvs: Vec<serde::de::IgnoredAny>,
}

impl EtcdTarget {
    /// A target whose keys live under `/bench/<prefix>/` and `/bench-q/<prefix>/`.
    pub fn new(pool: HttpPool, prefix: &str) -> EtcdTarget {
        let group_prefix = format!("/bench-q/{prefix}/");
        let group_range = RangeRequest {
            key: B64.encode(&group_prefix),
            range_end: Some(B64.encode(prefix_range_end(group_prefix.as_bytes()))),
        };
        EtcdTarget {
            pool,
            data_prefix: format!("/bench/{prefix}/"),
            group_prefix,
            value_b64: B64.encode(record_body()),
            group_range,
        }
    }

    fn key(&self, prefix: &str, key: u64) -> String {
        B64.encode(format!("{prefix}{}", key_name(key)))
    }

    async fn put_key(&self, client: usize, key: String) -> Result<(), OpError> {
        let (http, base) = self.pool.conn(client);
        let body = PutRequest {
            key,
            value: &self.value_b64,
        };
        send(http.post(format!("{base}/v3/kv/put")).json(&body))
            .await
            .map(drop)
    }

    async fn range(&self, client: usize, req: &RangeRequest) -> Result<usize, OpError> {
        let (http, base) = self.pool.conn(client);
        let body = send(http.post(format!("{base}/v3/kv/range")).json(req)).await?;
        let resp: RangeResponse =
            serde_json::from_slice(body.as_ref()).map_err(|_| OpError::BadBody)?;
        Ok(resp.kvs.len())
    }
}

impl Target for EtcdTarget {
    fn name(&self) -> &'static str {
        "etcd"
    }

    async fn put(&self, client: usize, key: u64) -> Result<(), OpError> {
        self.put_key(client, self.key(&self.data_prefix, key)).await
    }

    async fn get(&self, client: usize, key: u64) -> Result<(), OpError> {
        let req = RangeRequest {
            key: self.key(&self.data_prefix, key),
            range_end: None,
        };
        match self.range(client, &req).await? {
            0 => Err(OpError::NotFound),
            _ => Ok(()),
        }
    }

    async fn query(&self, client: usize) -> Result<usize, OpError> {
        self.range(client, &self.group_range).await
    }

    async fn put_group_member(&self, client: usize, member: u64) -> Result<(), OpError> {
        self.put_key(client, self.key(&self.group_prefix, member))
            .await
    }
}

/// The `range_end` that selects every key starting with `prefix`: the prefix with its last
/// byte below 0xff incremented (and the 0xff bytes after it dropped). All-0xff: `\0`, which
/// etcd reads as "to the end of the keyspace".
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(&last) = end.last() {
        if last < 0xff {
            if let Some(b) = end.last_mut() {
                *b = last + 1;
            }
            return end;
        }
        end.pop();
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_end_of_a_prefix() {
        assert_eq!(prefix_range_end(b"/bench-q/x/"), b"/bench-q/x0".to_vec());
        assert_eq!(prefix_range_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_range_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn request_bodies() {
        let pool = HttpPool::new(
            &["http://127.0.0.1:1".to_string()],
            None,
            1,
            std::time::Duration::from_secs(1),
        )
        .expect("pool");
        let t = EtcdTarget::new(pool, "p1");
        let decoded = B64.decode(t.key(&t.data_prefix, 3)).expect("base64");
        assert_eq!(decoded, b"/bench/p1/i-000003");
        assert_eq!(
            B64.decode(&t.value_b64).expect("base64").len(),
            super::super::target::RECORD_BYTES
        );
        let range = serde_json::to_value(&t.group_range).expect("json");
        assert_eq!(
            B64.decode(range["range_end"].as_str().expect("string"))
                .expect("base64"),
            b"/bench-q/p10"
        );
        let get = serde_json::to_string(&RangeRequest {
            key: "k".into(),
            range_end: None,
        })
        .expect("json");
        assert_eq!(get, r#"{"key":"k"}"#);
    }

    #[test]
    fn range_answers() {
        let empty: RangeResponse =
            serde_json::from_str(r#"{"header":{"revision":"5"}}"#).expect("json");
        assert_eq!(empty.kvs.len(), 0);
        let two: RangeResponse = serde_json::from_str(
            r#"{"header":{},"kvs":[{"key":"YQ==","value":"Yg=="},{"key":"Yw=="}],"count":"2"}"#,
        )
        .expect("json");
        assert_eq!(two.kvs.len(), 2);
    }
}
