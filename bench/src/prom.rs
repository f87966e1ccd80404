//! Reading a daemon's Prometheus page: `GET /metrics` over plain HTTP/1.0 and the sum of a
//! metric's samples. Used by the abuse scenario (the relay's refusal counters) and by the
//! mesh targets that check their path (forwarded streams, fallback tunnels).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Result;

/// The `/metrics` text (Prometheus exposition) served on `addr`.
pub fn scrape(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// The sum of every sample of the metric `name` (all label sets); `None` when absent.
pub fn metric_sum(body: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            (series.split('{').next()? == name).then(|| value.parse().ok())?
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_is_summed_over_its_label_sets() {
        let body = "# TYPE outrelay_relay_pipe_held_bytes gauge\n\
                    outrelay_relay_pipe_held_bytes{worker=\"0\"} 1048576\n\
                    outrelay_relay_pipe_held_bytes{worker=\"1\"} 1048576\n\
                    outrelay_relay_pipe_held_bytes_max 9\n";
        assert_eq!(
            metric_sum(body, "outrelay_relay_pipe_held_bytes"),
            Some(2_097_152.0)
        );
        assert_eq!(metric_sum(body, "absent"), None);
    }
}
