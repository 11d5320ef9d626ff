//! The guest side of the metadata service: one HTTP/1.1 request in, one
//! response out. GET reads the data store at the request path (a JSON
//! pointer), as JSON when the guest asks for `application/json`, else in
//! EC2's IMDS text format (an object lists its keys, a nested object's with a
//! trailing `/`; a string is itself). `PUT /latest/api/token` hands out
//! session tokens, which version 2 asks for on every GET.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Mmds, Version, MAX_TOKEN_TTL_SECS};

/// Largest request (head and body) the service reads; a bigger one gets a
/// 400 and the connection is closed.
pub const MAX_REQUEST: usize = 8192;

/// What came of the bytes a connection has received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No whole request yet.
    Incomplete,
    /// One request was answered: it took `consumed` bytes; the connection
    /// ends after the response if `close`.
    Answered {
        /// Bytes of the buffer the request took.
        consumed: usize,
        /// The whole HTTP response.
        response: Vec<u8>,
        /// Close the connection after the response.
        close: bool,
    },
}

struct Request<'a> {
    method: &'a str,
    path: &'a str,
    version: &'a str,
    headers: Vec<(&'a str, &'a str)>,
}

impl Request<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

fn parse_head(head: &str) -> Option<Request<'_>> {
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path, version) = (first.next()?, first.next()?, first.next()?);
    if first.next().is_some() || !version.starts_with("HTTP/1.") || !path.starts_with('/') {
        return None;
    }
    let mut headers = Vec::new();
    for line in lines {
        let (k, v) = line.split_once(':')?;
        headers.push((k.trim(), v.trim()));
    }
    Some(Request {
        method,
        path,
        version,
        headers,
    })
}

/// Answers the first request in `buf`, if it is whole.
pub fn serve(mmds: &mut Mmds, buf: &[u8], now: Instant) -> Outcome {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_REQUEST {
            return fail_whole(buf.len(), 400, "Request too large.");
        }
        return Outcome::Incomplete;
    };
    let head_len = end + 4;
    let Some(req) = std::str::from_utf8(&buf[..end]).ok().and_then(parse_head) else {
        return fail_whole(buf.len(), 400, "Malformed HTTP request.");
    };
    let body_len = match req.header("Content-Length").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(n)) if head_len + n <= MAX_REQUEST => n,
        Some(_) => return fail_whole(buf.len(), 400, "Bad or too large Content-Length."),
    };
    if buf.len() < head_len + body_len {
        return Outcome::Incomplete;
    }
    let close = req.version == "HTTP/1.0"
        || req
            .header("Connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"));
    let response = answer(mmds, &req, now);
    Outcome::Answered {
        consumed: head_len + body_len,
        response,
        close,
    }
}

fn fail_whole(len: usize, code: u16, message: &str) -> Outcome {
    Outcome::Answered {
        consumed: len,
        response: response(code, "text/plain", message.as_bytes(), None),
        close: true,
    }
}

fn answer(mmds: &mut Mmds, req: &Request, now: Instant) -> Vec<u8> {
    let text = |code, msg: &str| response(code, "text/plain", msg.as_bytes(), None);
    let path = req.path.split('?').next().unwrap_or("/");
    match req.method {
        "PUT" => {
            if path.trim_end_matches('/') != "/latest/api/token" {
                return text(404, &format!("Resource not found: {path}."));
            }
            if req.header("X-Forwarded-For").is_some() {
                return text(400, "Invalid header: X-Forwarded-For is not accepted.");
            }
            let ttl = req
                .header("X-metadata-token-ttl-seconds")
                .or_else(|| req.header("X-aws-ec2-metadata-token-ttl-seconds"));
            let Some(ttl) = ttl else {
                return text(
                    400,
                    "Token time to live value not found. Use `X-metadata-token-ttl-seconds` header to specify the token's lifetime.",
                );
            };
            match ttl.parse::<u64>() {
                Ok(s) if (1..=MAX_TOKEN_TTL_SECS).contains(&s) => {
                    match mmds.new_token(Duration::from_secs(s), now) {
                        Some(token) => text(200, &token),
                        None => text(500, "Cannot generate a token."),
                    }
                }
                _ => text(
                    400,
                    &format!(
                        "Invalid time to live value provided for token: {ttl}. Please provide a value between 1 and {MAX_TOKEN_TTL_SECS}."
                    ),
                ),
            }
        }
        "GET" => {
            let token = req
                .header("X-metadata-token")
                .or_else(|| req.header("X-aws-ec2-metadata-token"));
            let valid = token.is_some_and(|t| mmds.token_valid(t, now));
            match (mmds.version, token, valid) {
                (Version::V2, None, _) => {
                    return text(
                        401,
                        "No MMDS token provided. Use `X-metadata-token` or `X-aws-ec2-metadata-token` header to specify the session token.",
                    )
                }
                (Version::V2, Some(_), false) => return text(401, "MMDS token not valid."),
                (Version::V1, None, _) => mmds.counters.rx_no_token += 1,
                (Version::V1, Some(_), false) => mmds.counters.rx_invalid_token += 1,
                _ => {}
            }
            get(mmds, req, path)
        }
        _ => response(
            405,
            "text/plain",
            b"Not allowed HTTP method.",
            Some("Allow: GET, PUT"),
        ),
    }
}

fn get(mmds: &Mmds, req: &Request, path: &str) -> Vec<u8> {
    let not_found = || {
        response(
            404,
            "text/plain",
            format!("Resource not found: {path}.").as_bytes(),
            None,
        )
    };
    if !mmds.initialized {
        return not_found();
    }
    let pointer = path.trim_end_matches('/');
    let Some(value) = mmds.data.pointer(pointer) else {
        return not_found();
    };
    let json = !mmds.imds_compat
        && req
            .header("Accept")
            .is_some_and(|a| a.eq_ignore_ascii_case("application/json"));
    if json {
        let body = serde_json::to_vec(value).unwrap_or_default();
        return response(200, "application/json", &body, None);
    }
    match value {
        Value::String(s) => response(200, "text/plain", s.as_bytes(), None),
        Value::Object(map) => {
            let keys: Vec<String> = map
                .iter()
                .map(|(k, v)| {
                    if v.is_object() {
                        format!("{k}/")
                    } else {
                        k.clone()
                    }
                })
                .collect();
            response(200, "text/plain", keys.join("\n").as_bytes(), None)
        }
        _ => response(
            501,
            "text/plain",
            b"Cannot retrieve value. The value has an unsupported type.",
            None,
        ),
    }
}

fn response(code: u16, content_type: &str, body: &[u8], extra: Option<&str>) -> Vec<u8> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        501 => "Not Implemented",
        _ => "Internal Server Error",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nServer: vmm-mmds\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(h) = extra {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store(version: Version) -> Mmds {
        let mut m = Mmds::new(51200);
        m.configure(version, false);
        m.put(json!({"latest": {"meta-data": {"ami-id": "ami-1", "n": 5, "net": {"a": "b"}}}}))
            .unwrap();
        m
    }

    fn ask(m: &mut Mmds, req: &str) -> (u16, String, usize, bool) {
        match serve(m, req.as_bytes(), Instant::now()) {
            Outcome::Answered {
                consumed,
                response,
                close,
            } => {
                let text = String::from_utf8(response).unwrap();
                let code = text[9..12].parse().unwrap();
                let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
                (code, body, consumed, close)
            }
            Outcome::Incomplete => panic!("incomplete: {req:?}"),
        }
    }

    #[test]
    fn v1_gets_json_and_imds_formats() {
        let mut m = store(Version::V1);
        let r = ask(&mut m, "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!((r.0, r.1.as_str()), (200, "ami-id\nn\nnet/"));
        let r = ask(&mut m, "GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n");
        assert_eq!((r.0, r.1.as_str()), (200, "ami-1"));
        let r = ask(
            &mut m,
            "GET /latest/meta-data/net HTTP/1.1\r\nAccept: application/json\r\n\r\n",
        );
        assert_eq!((r.0, r.1.as_str()), (200, r#"{"a":"b"}"#));
        let r = ask(&mut m, "GET /latest/meta-data/n HTTP/1.1\r\n\r\n");
        assert_eq!(r.0, 501);
        let r = ask(&mut m, "GET /nope HTTP/1.1\r\n\r\n");
        assert_eq!(r.0, 404);
        let r = ask(&mut m, "POST / HTTP/1.1\r\n\r\n");
        assert_eq!(r.0, 405);
        assert_eq!(m.counters.rx_no_token, 5);
    }

    #[test]
    fn v2_needs_a_token_from_put() {
        let mut m = store(Version::V2);
        let r = ask(&mut m, "GET /latest HTTP/1.1\r\n\r\n");
        assert_eq!(r.0, 401);
        let r = ask(
            &mut m,
            "GET /latest HTTP/1.1\r\nX-metadata-token: forged\r\n\r\n",
        );
        assert_eq!(r.0, 401);
        for bad in ["0", "21601", "x"] {
            let req = format!(
                "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: {bad}\r\n\r\n"
            );
            assert_eq!(ask(&mut m, &req).0, 400, "ttl {bad}");
        }
        let r = ask(
            &mut m,
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
        );
        assert_eq!(r.0, 400);
        let (code, token, _, _) = ask(
            &mut m,
            "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n",
        );
        assert_eq!(code, 200);
        let req = format!("GET /latest HTTP/1.1\r\nX-aws-ec2-metadata-token: {token}\r\n\r\n");
        let r = ask(&mut m, &req);
        assert_eq!((r.0, r.1.as_str()), (200, "meta-data/"));
    }

    #[test]
    fn requests_are_framed_by_their_head_and_content_length() {
        let mut m = store(Version::V1);
        assert_eq!(
            serve(&mut m, b"GET /latest HTTP/1.1\r\nHost:", Instant::now()),
            Outcome::Incomplete
        );
        let two = "GET /latest HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n";
        let (code, _, consumed, close) = ask(&mut m, two);
        assert_eq!((code, consumed, close), (200, two.len() - 18, false));
        let (_, _, _, close) = ask(&mut m, "GET / HTTP/1.0\r\n\r\n");
        assert!(close);
        let (_, _, _, close) = ask(&mut m, "GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(close);
        // Garbage, an oversized head, a lying length: 400 and close.
        for bad in [
            "\u{1}\u{2} HTTP\r\n\r\n".to_string(),
            format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_REQUEST)),
            "GET / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n".to_string(),
        ] {
            let (code, _, consumed, close) = ask(&mut m, &bad);
            assert_eq!((code, consumed, close), (400, bad.len(), true));
        }
        // Before any PUT /mmds every GET is a 404.
        let mut empty = Mmds::new(100);
        assert_eq!(ask(&mut empty, "GET / HTTP/1.1\r\n\r\n").0, 404);
    }
}
