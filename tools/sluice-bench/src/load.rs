//! `sluice-bench load`: a closed-loop load generator for an Open Inference Protocol REST
//! endpoint (`POST /v2/models/{model}/infer`, the model's `features` tensor as JSON), the same
//! for sluice and for any other server, so that their figures compare.

use std::time::{Duration, Instant};

/// What one run measured.
#[derive(Debug, serde::Serialize)]
pub struct Figures {
    pub concurrency: usize,
    pub requests: usize,
    pub errors: usize,
    /// Answers refused for capacity (429).
    pub refused: usize,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
}

/// `concurrency` clients, each sending its next request as soon as the last is answered, for
/// `seconds` after `warmup` seconds not counted; every request has `rows` rows of `features`
/// features.
pub fn run(
    url: &str,
    model: &str,
    concurrency: usize,
    seconds: f64,
    warmup: f64,
    rows: usize,
    features: usize,
) -> anyhow::Result<Figures> {
    let endpoint = format!("{}/v2/models/{model}/infer", url.trim_end_matches('/'));
    let data: Vec<Vec<f32>> = (0..rows)
        .map(|r| {
            (0..features)
                .map(|f| ((r * 31 + f * 7) % 13) as f32 / 13.0)
                .collect()
        })
        .collect();
    let body = serde_json::json!({
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [rows, features], "data": data}]
    })
    .to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(concurrency)
            .tcp_nodelay(true)
            .build()?;
        let start = Instant::now();
        let measure_from = start + Duration::from_secs_f64(warmup);
        let end = measure_from + Duration::from_secs_f64(seconds);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let (client, endpoint, body) = (client.clone(), endpoint.clone(), body.clone());
            tasks.spawn(async move {
                let (mut latencies, mut errors, mut refused) = (Vec::new(), 0usize, 0usize);
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let answer = client
                        .post(&endpoint)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await;
                    let ok = match answer {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let _ = r.bytes().await;
                            if status == 429 {
                                refused += 1;
                            }
                            status == 200
                        }
                        Err(_) => false,
                    };
                    if sent >= measure_from {
                        if ok {
                            latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                        } else {
                            errors += 1;
                        }
                    }
                }
                (latencies, errors, refused)
            });
        }
        let (mut latencies, mut errors, mut refused) = (Vec::new(), 0, 0);
        while let Some(done) = tasks.join_next().await {
            let (l, e, r) = done?;
            latencies.extend(l);
            errors += e;
            refused += r;
        }
        latencies.sort_by(f64::total_cmp);
        let quantile = |q: f64| {
            latencies
                .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        Ok(Figures {
            concurrency,
            requests: latencies.len(),
            errors,
            refused,
            seconds,
            requests_per_second: latencies.len() as f64 / seconds,
            p50_ms: quantile(0.5),
            p99_ms: quantile(0.99),
            mean_ms: latencies.iter().sum::<f64>() / latencies.len().max(1) as f64,
        })
    })
}
