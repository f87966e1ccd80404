//! What the relay's and the controller's dashboards share (issue 21): the HTTP loop of their
//! metrics listener (hyper, HTTP/1.1, GET only), the routes `GET /` (an HTML page),
//! `GET /status.json` (the JSON snapshot the page is rendered from) and `GET /metrics`, the
//! response headers, and the page layout.
//!
//! Pages are server-rendered with `maud` (compile-time templates: every interpolated value is
//! HTML-escaped by construction), carry no script and no external asset (inline CSS only, which
//! is all the `Content-Security-Policy` allows), and refresh themselves every [`REFRESH_S`]
//! seconds. Nothing here writes: writes stay in the CLI, any other method is `405`.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde_json::Value;
use tokio::net::TcpListener;

/// The pages' `Content-Security-Policy`: nothing may load, inline style only (no script).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'";
/// Seconds between the pages' automatic refreshes (`<meta http-equiv="refresh">`).
pub const REFRESH_S: u32 = 5;
/// Connections served at once; further ones wait in the listen backlog.
pub const CONNECTIONS_MAX: usize = 64;
/// Longest wait for a request head, in milliseconds.
pub const HEADER_READ_TIMEOUT_MS: u64 = 5_000;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /`: the HTML page.
    Page,
    /// `GET /status.json`: the JSON snapshot.
    Snapshot,
    /// `GET /metrics`: Prometheus text.
    Metrics,
    /// A GET of any other path: 404.
    NotFound,
    /// Any other method: 405 (the dashboards are read-only).
    MethodNotAllowed,
}

impl Route {
    /// The route of `method` and `path` (without the query string).
    pub fn of(method: &Method, path: &str) -> Route {
        if method != Method::GET {
            return Route::MethodNotAllowed;
        }
        match path {
            "/" | "/index.html" => Route::Page,
            "/status.json" => Route::Snapshot,
            "/metrics" => Route::Metrics,
            _ => Route::NotFound,
        }
    }
}

/// Serves the metrics listener until the task is dropped: each request's [`Route`] goes to
/// `handler`, which answers with one of [`page`], [`json`], [`metrics`] or [`refusal`].
/// At most [`CONNECTIONS_MAX`] connections at once; a request head must arrive within
/// [`HEADER_READ_TIMEOUT_MS`].
pub async fn serve<H, F>(listener: TcpListener, handler: H)
where
    H: Fn(Route) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let handler = Arc::new(handler);
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let answer = handler(Route::of(req.method(), req.uri().path()));
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_millis(HEADER_READ_TIMEOUT_MS))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(slot);
        });
    }
}

/// A `200` HTML page (`text/html`) with the dashboards' headers.
pub fn page(markup: Markup) -> Response<Full<Bytes>> {
    respond(
        StatusCode::OK,
        "text/html; charset=utf-8",
        markup.into_string(),
    )
}

/// A `200` JSON document (`application/json`) with the dashboards' headers.
pub fn json(value: &Value) -> Response<Full<Bytes>> {
    respond(StatusCode::OK, "application/json", format!("{value}\n"))
}

/// A `200` Prometheus exposition (`text/plain; version=0.0.4`).
pub fn metrics(text: String) -> Response<Full<Bytes>> {
    respond(StatusCode::OK, "text/plain; version=0.0.4", text)
}

/// The answer of [`Route::NotFound`] (`404`), [`Route::MethodNotAllowed`] (`405`, with
/// `Allow: GET`) or of any other route a daemon does not serve (`404`).
pub fn refusal(route: Route) -> Response<Full<Bytes>> {
    if route == Route::MethodNotAllowed {
        let mut r = respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "method not allowed: read-only (writes go through the outrelay CLI)\n".to_owned(),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    respond(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        "not found\n".to_owned(),
    )
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The whole page: doctype, auto-refresh, inline CSS, `title` as the heading, `summary` lines
/// under it, then `body`.
pub fn layout(title: &str, summary: &[String], body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content=(REFRESH_S);
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
                style { (PreEscaped(CSS)) }
            }
            body {
                h1 { (title) }
                p.note {
                    "Read-only; refreshes every " (REFRESH_S) " s. The same data as JSON: "
                    a href="status.json" { "status.json" } ". Writes go through the outrelay CLI."
                }
                @for line in summary {
                    p.summary { (line) }
                }
                (body)
            }
        }
    }
}

/// A section: a heading, an optional note, and its content.
pub fn section(heading: &str, note: Option<&str>, content: Markup) -> Markup {
    html! {
        section {
            h2 { (heading) }
            @if let Some(note) = note {
                p.note { (note) }
            }
            (content)
        }
    }
}

/// A table of JSON objects: `columns` first (in that order, a missing key shows `-`), then one
/// "details" column of every other key as `key=value`, so fields added to the documents later
/// show up without another edit. `labels` renames columns (same length as `columns`, or empty
/// for the key names). An empty `rows` shows `empty`.
pub fn table(rows: &[Value], columns: &[&str], labels: &[&str], empty: &str) -> Markup {
    if rows.is_empty() {
        return html! { p.empty { (empty) } };
    }
    let has_details = rows.iter().any(|r| !extra_fields(r, columns).is_empty());
    html! {
        table {
            thead {
                tr {
                    @for (i, c) in columns.iter().enumerate() {
                        th { (labels.get(i).copied().unwrap_or(c)) }
                    }
                    @if has_details { th { "details" } }
                }
            }
            tbody {
                @for row in rows {
                    tr {
                        @for c in columns {
                            td { (text(row.get(*c).unwrap_or(&Value::Null))) }
                        }
                        @if has_details {
                            td.details {
                                @for (k, v) in extra_fields(row, columns) {
                                    span.kv { (k) "=" (text(v)) } " "
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A two-column table (key, value) of an object's fields; `nonzero_only` leaves out zero
/// numbers (counters that never moved). An object with nothing to show shows `empty`.
pub fn key_values(object: &Value, nonzero_only: bool, empty: &str) -> Markup {
    let fields: Vec<(&String, &Value)> = object
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| !(nonzero_only && v.as_u64() == Some(0)))
                .collect()
        })
        .unwrap_or_default();
    if fields.is_empty() {
        return html! { p.empty { (empty) } };
    }
    html! {
        table.kv {
            tbody {
                @for (k, v) in fields {
                    tr { th { (k) } td { (text(v)) } }
                }
            }
        }
    }
}

/// Any JSON value, for fields a page does not know by name: an array of objects as a
/// [`table`] with the first object's keys as columns, an object as [`key_values`], anything
/// else as [`text`].
pub fn any(value: &Value) -> Markup {
    match value {
        Value::Array(rows) if rows.first().is_some_and(Value::is_object) => {
            let columns: Vec<&str> = rows
                .first()
                .and_then(Value::as_object)
                .map(|m| m.keys().map(String::as_str).collect())
                .unwrap_or_default();
            table(rows, &columns, &[], "none")
        }
        Value::Object(_) => key_values(value, false, "none"),
        _ => html! { p { (text(value)) } },
    }
}

/// The fields of `object` whose keys are not in `known`, in key order.
pub fn extra_fields<'a>(object: &'a Value, known: &[&str]) -> Vec<(&'a String, &'a Value)> {
    object
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !known.contains(&k.as_str()))
                .collect()
        })
        .unwrap_or_default()
}

/// One JSON value as plain text (escaped by the template, never here): a string as is, `null`
/// as `-`, an object as `key=value` pairs, an array as comma-separated values.
pub fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.to_owned(),
        Value::Number(n) => n.to_string(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(", "),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| match v {
                Value::Object(_) | Value::Array(_) => format!("{k}={{{}}}", text(v)),
                _ => format!("{k}={}", text(v)),
            })
            .collect::<Vec<_>>()
            .join(" "),
    }
}

const CSS: &str = "\
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2330;background:#fafbfc}\
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.4em 0 .4em;\
border-bottom:1px solid #d0d7de;padding-bottom:.2em}\
p{margin:.2em 0}.note{color:#57606a;font-size:.9em}.summary{font-family:ui-monospace,monospace}\
.empty{color:#57606a;font-style:italic}\
table{border-collapse:collapse;margin:.3em 0;font-size:.92em}\
th,td{border:1px solid #d0d7de;padding:.2em .5em;text-align:left;vertical-align:top}\
thead th{background:#eef1f4}table.kv th{background:#f3f5f7;font-weight:normal}\
td{font-family:ui-monospace,monospace;overflow-wrap:anywhere}\
td.details{color:#57606a;font-size:.9em}.warn{color:#9a3412;font-weight:bold}";

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn routes_are_get_only() {
        assert_eq!(Route::of(&Method::GET, "/"), Route::Page);
        assert_eq!(Route::of(&Method::GET, "/status.json"), Route::Snapshot);
        assert_eq!(Route::of(&Method::GET, "/metrics"), Route::Metrics);
        assert_eq!(Route::of(&Method::GET, "/x"), Route::NotFound);
        assert_eq!(Route::of(&Method::POST, "/"), Route::MethodNotAllowed);
        assert_eq!(
            Route::of(&Method::HEAD, "/metrics"),
            Route::MethodNotAllowed
        );
        let r = refusal(Route::MethodNotAllowed);
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "GET");
    }

    #[test]
    fn values_from_the_wire_are_escaped_and_unknown_fields_shown() {
        let rows = [json!({"name": "<script>x</script>", "new_field": {"a&b": 1}})];
        let html = layout(
            "t",
            &["s<".to_owned()],
            table(&rows, &["name"], &[], "none"),
        )
        .into_string();
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;x&lt;/script&gt;"), "{html}");
        assert!(html.contains("new_field=a&amp;b=1"), "{html}");
        assert!(html.contains("s&lt;"), "{html}");
        assert!(
            html.contains(r#"http-equiv="refresh" content="5""#),
            "{html}"
        );
        let page = page(html! { p { "x" } });
        assert_eq!(
            page.headers()[header::CONTENT_SECURITY_POLICY],
            CONTENT_SECURITY_POLICY
        );
    }

    #[test]
    fn text_of_values() {
        assert_eq!(text(&json!(null)), "-");
        assert_eq!(text(&json!([1, "a"])), "1, a");
        assert_eq!(
            text(&json!({"to_client": 5, "x": {"y": true}})),
            "to_client=5 x={y=yes}"
        );
    }
}
