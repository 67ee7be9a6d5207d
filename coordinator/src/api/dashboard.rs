//! The dashboard at `/`: three static files built into the binary (no Node
//! toolchain), which poll `/admin/status`, drain and undrain nodes through the admin
//! API, and stream a chat from `/v1/chat/completions`. The files hold no data, so
//! they are served without a key; the page asks for one when the API answers 401
//! and sends it with every call it makes.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("../../dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("../../dashboard/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("../../dashboard/dashboard.css");

/// The paths the dashboard's files are served at: no key is needed for them.
pub const PATHS: [&str; 3] = [INDEX_PATH, SCRIPT_PATH, STYLE_PATH];
const INDEX_PATH: &str = "/";
const SCRIPT_PATH: &str = "/dashboard.js";
const STYLE_PATH: &str = "/dashboard.css";

/// The routes of the three files.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route(INDEX_PATH, get(index)).route(SCRIPT_PATH, get(script)).route(STYLE_PATH, get(style))
}

fn file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    // `no-cache`: a browser checks again after an upgrade of the coordinator.
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body)
}

async fn index() -> impl IntoResponse {
    file("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> impl IntoResponse {
    file("text/javascript; charset=utf-8", DASHBOARD_JS)
}

async fn style() -> impl IntoResponse {
    file("text/css; charset=utf-8", DASHBOARD_CSS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_the_script_and_the_style_it_is_served_with() {
        assert!(INDEX_HTML.contains(r#"src="/dashboard.js""#));
        assert!(INDEX_HTML.contains(r#"href="/dashboard.css""#));
        assert!(INDEX_HTML.contains("width=device-width"), "readable on a phone");
    }

    #[test]
    fn the_script_puts_what_peers_send_into_the_page_as_text_only() {
        // A node's name comes from whoever runs the worker.
        assert!(!DASHBOARD_JS.contains("innerHTML"));
        assert!(!DASHBOARD_JS.contains("insertAdjacentHTML"));
        assert!(!DASHBOARD_JS.contains("document.write"));
    }
}
