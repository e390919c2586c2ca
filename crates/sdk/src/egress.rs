//! The egress guard: which destinations a piece's HTTP calls may reach.
//!
//! Comparing host names is not enough — `localhost`, `[::ffff:127.0.0.1]`, a name whose DNS
//! answer is `10.0.0.5`, or a redirect to `http://169.254.169.254/` all name a host that is not
//! on a deny list. So the guard checks **addresses**, where the connection is made:
//!
//! - [`EgressGuard::check_url`] runs before a request (and before every redirect): scheme,
//!   `https_only`, host name lists, and IP literals, which never reach a resolver;
//! - [`GuardedResolver`] is the HTTP client's DNS resolver: it resolves a name and hands the
//!   client only the addresses the policy allows, so the address that was checked is the
//!   address that is connected to (no window for DNS rebinding).
//!
//! Loopback, private (RFC 1918), link-local, CGNAT, unique-local, multicast, reserved and
//! cloud-metadata addresses are denied unless the policy's `allow` list names the network or
//! the host — internal APIs behind a VPN are reached that way, on purpose, by the operator.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use serde::{Deserialize, Serialize};

/// The largest response body a piece's HTTP client reads unless the step says otherwise.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 10 * 1024 * 1024;

/// The installation's egress policy, as configured (`[egress]`) and as sent to piece processes
/// in `describe`. Unknown fields are ignored, as everywhere in piece protocol v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EgressPolicy {
    /// Destinations pieces may reach although their addresses are private, loopback or
    /// otherwise internal: networks (`10.20.0.0/16`), addresses (`10.20.0.7`, `::1`), or hosts
    /// (`tickets.corp.internal`, `*.corp.internal`) whose addresses may be internal.
    pub allow: Vec<String>,
    /// When set, the only hosts pieces may call: host names (`api.example.com`,
    /// `*.example.com`) matched against the URL's host, networks matched against IP literals.
    pub allow_hosts: Vec<String>,
    /// Hosts, addresses and networks pieces may never call, whatever else allows them.
    pub deny_hosts: Vec<String>,
    /// Refuse plain `http://` URLs, redirects included (the guide: "use HTTPS for all API
    /// calls").
    pub https_only: bool,
    /// The largest response body read by `HttpClient::send` (and `fetch`); a longer one fails
    /// the call fatally. A step may set its own (`max_response_bytes`).
    pub max_response_bytes: u64,
}

impl Default for EgressPolicy {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            allow_hosts: Vec::new(),
            deny_hosts: Vec::new(),
            https_only: false,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

/// The networks `EgressPolicy::allowing_loopback` opens: what a local mock listens on.
const LOOPBACK: [&str; 3] = ["127.0.0.0/8", "::1/128", "localhost"];

impl EgressPolicy {
    /// The default policy plus loopback: for `piecework dev`, `piece test` and tests, whose
    /// mock APIs listen on 127.0.0.1. Never the default of a deployed process.
    pub fn allowing_loopback() -> Self {
        let mut policy = Self::default();
        policy.allow_loopback();
        policy
    }

    /// Adds loopback (`127.0.0.0/8`, `::1`, `localhost`) to `allow`, unless already there.
    pub fn allow_loopback(&mut self) {
        for entry in LOOPBACK {
            if !self.allow.iter().any(|a| a == entry) {
                self.allow.push(entry.to_owned());
            }
        }
    }

    /// Whether loopback is allowed (for a start-up notice).
    pub fn allows_loopback(&self) -> bool {
        self.compile().is_ok_and(|guard| {
            guard
                .check_address("localhost", IpAddr::V4(Ipv4Addr::LOCALHOST))
                .is_ok()
        })
    }

    /// Adds comma-separated entries (`PW_EGRESS_ALLOW`) to `allow`.
    pub fn extend_allow(&mut self, list: &str) {
        self.allow.extend(
            list.split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(str::to_owned),
        );
    }

    /// Checks every entry; the error names the list and the entry.
    pub fn validate(&self) -> Result<(), String> {
        self.compile().map(|_| ())
    }

    /// Parses the lists into the guard that enforces them.
    pub fn compile(&self) -> Result<EgressGuard, String> {
        let parse = |field: &str, entries: &[String]| {
            entries
                .iter()
                .map(|e| Pattern::from_str(e).map_err(|why| format!("{field}: {e:?} {why}")))
                .collect::<Result<Vec<_>, _>>()
        };
        if self.max_response_bytes == 0 {
            return Err("max_response_bytes: must be at least 1".to_owned());
        }
        Ok(EgressGuard {
            allow: parse("allow", &self.allow)?,
            allow_hosts: parse("allow_hosts", &self.allow_hosts)?,
            deny_hosts: parse("deny_hosts", &self.deny_hosts)?,
            https_only: self.https_only,
        })
    }

    /// Checks a URL against the policy before any address is known (host names, IP
    /// literals, scheme). Kept for callers that only validate; requests go through
    /// [`EgressGuard`].
    pub fn check(&self, url: &Url) -> Result<(), crate::PieceError> {
        let guard = self
            .compile()
            .map_err(|e| crate::PieceError::fatal(format!("egress policy: {e}")))?;
        guard.check_url(url).map_err(Into::into)
    }
}

/// A destination named in a policy list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Net(IpNet),
    /// Lowercase, without a trailing dot; `*.` matches subdomains (not the domain itself).
    Host(String),
}

impl FromStr for Pattern {
    type Err = &'static str;

    fn from_str(entry: &str) -> Result<Self, Self::Err> {
        let entry = entry.trim();
        if let Ok(net) = entry.parse::<IpNet>() {
            return Ok(Pattern::Net(net.trunc()));
        }
        let bare = entry.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(Pattern::Net(IpNet::from(ip)));
        }
        if entry.contains('/') {
            return Err("is not a network (address/prefix)");
        }
        let host = entry.trim_end_matches('.').to_ascii_lowercase();
        let name = host.strip_prefix("*.").unwrap_or(&host);
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
        if !valid {
            return Err("is not a host name, an address or a network");
        }
        Ok(Pattern::Host(host))
    }
}

impl Pattern {
    fn matches_host(&self, host: &str) -> bool {
        match self {
            Pattern::Host(pattern) => host_matches(pattern, host),
            Pattern::Net(_) => false,
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match self {
            Pattern::Net(net) => net.contains(&ip),
            Pattern::Host(_) => false,
        }
    }
}

fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len()
                && host.ends_with(suffix)
                && host[..host.len() - suffix.len()].ends_with('.')
        }
        None => pattern == host,
    }
}

/// Why the egress guard refused a destination. The message names the host or address, never
/// the URL (query strings carry tokens). It survives inside an HTTP client error, so the call
/// is classified fatal rather than as a network failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressDenied(String);

impl EgressDenied {
    fn new(message: impl Into<String>) -> Self {
        Self(format!("egress policy: {}", message.into()))
    }

    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EgressDenied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EgressDenied {}

impl From<EgressDenied> for crate::PieceError {
    fn from(denied: EgressDenied) -> Self {
        crate::PieceError::fatal(denied.0)
    }
}

/// A compiled [`EgressPolicy`].
#[derive(Debug, Clone)]
pub struct EgressGuard {
    allow: Vec<Pattern>,
    allow_hosts: Vec<Pattern>,
    deny_hosts: Vec<Pattern>,
    https_only: bool,
}

impl EgressGuard {
    /// What can be decided from the URL alone: the scheme, host names against the lists, and
    /// an IP literal's address (IP literals are connected to without a resolver).
    pub fn check_url(&self, url: &Url) -> Result<(), EgressDenied> {
        let scheme = url.scheme();
        let Some(host) = url.host() else {
            return Err(EgressDenied::new("the URL names no host"));
        };
        let shown = url.host_str().unwrap_or_default();
        if scheme != "https" && scheme != "http" {
            return Err(EgressDenied::new(format!(
                "scheme {scheme} to {shown} is not allowed (http and https only)"
            )));
        }
        if self.https_only && scheme != "https" {
            return Err(EgressDenied::new(format!(
                "plain {scheme} to {shown} is not allowed (https_only)"
            )));
        }
        match host {
            url::Host::Domain(name) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                if self.deny_hosts.iter().any(|p| p.matches_host(&name)) {
                    return Err(EgressDenied::new(format!("host {name} is denied")));
                }
                if !self.allow_hosts.is_empty()
                    && !self.allow_hosts.iter().any(|p| p.matches_host(&name))
                {
                    return Err(EgressDenied::new(format!(
                        "host {name} is not in allow_hosts"
                    )));
                }
                Ok(())
            }
            url::Host::Ipv4(ip) => self.check_literal(IpAddr::V4(ip)),
            url::Host::Ipv6(ip) => self.check_literal(IpAddr::V6(ip)),
        }
    }

    fn check_literal(&self, ip: IpAddr) -> Result<(), EgressDenied> {
        if !self.allow_hosts.is_empty() && !self.allow_hosts.iter().any(|p| p.contains(ip)) {
            return Err(EgressDenied::new(format!(
                "address {ip} is not in allow_hosts"
            )));
        }
        self.check_address(&ip.to_string(), ip)
    }

    /// Whether `host` may be reached at `ip` (one of its resolved addresses, or the literal).
    pub fn check_address(&self, host: &str, ip: IpAddr) -> Result<(), EgressDenied> {
        let canonical = canonical(ip);
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if self
            .deny_hosts
            .iter()
            .any(|p| p.contains(ip) || p.contains(canonical))
        {
            return Err(EgressDenied::new(format!(
                "{} is denied",
                describe(&host, ip)
            )));
        }
        let Some(range) = internal_range(canonical) else {
            return Ok(());
        };
        let allowed = self
            .allow
            .iter()
            .any(|p| p.contains(ip) || p.contains(canonical) || p.matches_host(&host));
        if allowed {
            return Ok(());
        }
        Err(EgressDenied::new(format!(
            "{} is a {range} address; add it to [egress] allow (PW_EGRESS_ALLOW) if pieces should reach it",
            describe(&host, ip)
        )))
    }
}

fn describe(host: &str, ip: IpAddr) -> String {
    if host == ip.to_string() {
        format!("address {ip}")
    } else {
        format!("host {host} at {ip}")
    }
}

/// An IPv6 address that carries an IPv4 address a connection reaches (mapped, compatible,
/// NAT64, 6to4) as that IPv4 address; anything else as it is.
fn canonical(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else {
        return ip;
    };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let s = v6.segments();
    let embedded_low = || Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32);
    // ::a.b.c.d (IPv4-compatible, deprecated) — but not :: and ::1 themselves.
    if s[..6] == [0; 6] && (s[6] != 0 || s[7] > 1) {
        return IpAddr::V4(embedded_low());
    }
    // 64:ff9b::/96, the well-known NAT64 prefix.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return IpAddr::V4(embedded_low());
    }
    // 2002:AABB:CCDD::/48, 6to4.
    if s[0] == 0x2002 {
        return IpAddr::V4(Ipv4Addr::from(((s[1] as u32) << 16) | s[2] as u32));
    }
    ip
}

/// The kind of internal or special-purpose range `ip` is in, if any.
fn internal_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => internal_v6(v6),
    }
}

fn internal_v4(ip: Ipv4Addr) -> Option<&'static str> {
    const METADATA: [Ipv4Addr; 3] = [
        Ipv4Addr::new(169, 254, 169, 254), // AWS, GCP, Azure, OpenStack
        Ipv4Addr::new(100, 100, 100, 200), // Alibaba Cloud
        Ipv4Addr::new(192, 0, 0, 192),     // Oracle Cloud
    ];
    let [a, b, c, _] = ip.octets();
    Some(match (a, b) {
        _ if METADATA.contains(&ip) => "cloud metadata",
        (0, _) => "unspecified (this host)",
        (10, _) | (172, 16..=31) | (192, 168) => "private (RFC 1918)",
        (100, 64..=127) => "shared (CGNAT)",
        (127, _) => "loopback",
        (169, 254) => "link-local",
        (192, 0) if c == 0 || c == 2 => "reserved",
        (198, 18..=19) => "reserved (benchmarking)",
        (198, 51) if c == 100 => "reserved (documentation)",
        (203, 0) if c == 113 => "reserved (documentation)",
        (224..=239, _) => "multicast",
        (240..=255, _) => "reserved",
        _ => return None,
    })
}

fn internal_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    Some(match s[0] {
        _ if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) => "cloud metadata",
        _ if ip.is_unspecified() => "unspecified (this host)",
        _ if ip.is_loopback() => "loopback",
        // Embedded IPv4 forms were made IPv4 by `canonical`; what is left here is a prefix
        // whose IPv4 part is unknowable or internal by design.
        0 if s[1..6] == [0; 5] => "reserved",
        0x64 if s[1] == 0xff9b => "reserved (local NAT64)",
        0x100 if s[1..4] == [0; 3] => "reserved (discard)",
        0x2001 if s[1] == 0 => "reserved (Teredo)",
        0x2001 if s[1] == 0xdb8 => "reserved (documentation)",
        0xfc00..=0xfdff => "unique-local",
        0xfe80..=0xfebf => "link-local",
        0xfec0..=0xfeff => "site-local",
        0xff00..=0xffff => "multicast",
        _ => return None,
    })
}

/// The HTTP client's resolver: resolves with the system's resolver and keeps only the
/// addresses the guard allows; when none is left the lookup fails with [`EgressDenied`].
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    guard: Arc<EgressGuard>,
}

impl GuardedResolver {
    pub fn new(guard: Arc<EgressGuard>) -> Self {
        Self { guard }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.guard.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut denied = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|addr| match guard.check_address(&host, addr.ip()) {
                    Ok(()) => true,
                    Err(why) => {
                        denied.get_or_insert(why);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let why = denied.unwrap_or_else(|| {
                    EgressDenied::new(format!("host {host} resolves to no address"))
                });
                return Err(why.into());
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// The egress refusal inside an HTTP client error, if that is what it is.
pub fn denial_in<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a EgressDenied> {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(denied) = err.downcast_ref::<EgressDenied>() {
            return Some(denied);
        }
        // An `io::Error` hides the error it wraps from `source()`.
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            && let Some(denied) = denial_in(inner)
        {
            return Some(denied);
        }
        current = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(policy: EgressPolicy) -> EgressGuard {
        policy.compile().unwrap()
    }

    fn url_ok(guard: &EgressGuard, url: &str) -> bool {
        guard.check_url(&Url::parse(url).unwrap()).is_ok()
    }

    #[test]
    fn every_loopback_spelling_in_a_url_is_denied_by_default() {
        let guard = guard(EgressPolicy::default());
        for url in [
            "http://127.0.0.1/",
            "http://127.1/",
            "http://0x7f.0.0.1/",
            "http://2130706433/",
            "http://017700000001/",
            "http://127.255.255.254:8080/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[0:0:0:0:0:ffff:127.0.0.1]/",
            "http://[::127.0.0.1]/",
            "http://[64:ff9b::7f00:1]/",
            "http://[2002:7f00:1::]/",
            "http://0.0.0.0/",
            "http://[::]/",
        ] {
            let err = guard
                .check_url(&Url::parse(url).unwrap())
                .expect_err(url)
                .to_string();
            assert!(err.starts_with("egress policy: address "), "{url}: {err}");
        }
    }

    #[test]
    fn internal_ranges_are_named() {
        let guard = guard(EgressPolicy::default());
        let why = |ip: &str| {
            guard
                .check_address("x.example", ip.parse().unwrap())
                .unwrap_err()
                .to_string()
        };
        for (ip, kind) in [
            ("10.1.2.3", "private (RFC 1918)"),
            ("172.16.0.1", "private (RFC 1918)"),
            ("172.31.255.255", "private (RFC 1918)"),
            ("192.168.1.1", "private (RFC 1918)"),
            ("100.64.0.1", "shared (CGNAT)"),
            ("169.254.169.254", "cloud metadata"),
            ("100.100.100.200", "cloud metadata"),
            ("fd00:ec2::254", "cloud metadata"),
            ("169.254.10.1", "link-local"),
            ("fe80::1", "link-local"),
            ("fc00::1", "unique-local"),
            ("fd12:3456::1", "unique-local"),
            ("::ffff:10.0.0.1", "private (RFC 1918)"),
            ("::ffff:169.254.169.254", "cloud metadata"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "reserved"),
            ("2001::1", "reserved (Teredo)"),
        ] {
            let err = why(ip);
            assert!(err.contains(&format!("a {kind} address")), "{ip}: {err}");
            assert!(err.contains("x.example"), "{err}");
        }
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(
                guard
                    .check_address("x.example", public.parse().unwrap())
                    .is_ok(),
                "{public}"
            );
        }
    }

    #[test]
    fn allow_opens_networks_and_hosts() {
        let guard = guard(EgressPolicy {
            allow: vec![
                "10.20.0.0/16".into(),
                "tickets.corp.internal".into(),
                "*.vpn.corp".into(),
                "::1".into(),
            ],
            ..EgressPolicy::default()
        });
        let ok = |host: &str, ip: &str| guard.check_address(host, ip.parse().unwrap()).is_ok();
        assert!(ok("anything.example", "10.20.3.4"));
        assert!(ok("anything.example", "::ffff:10.20.3.4"));
        assert!(!ok("anything.example", "10.21.0.1"));
        assert!(ok("tickets.corp.internal", "10.99.0.1"));
        assert!(ok("TICKETS.corp.internal.", "10.99.0.1"));
        assert!(ok("a.vpn.corp", "192.168.0.9"));
        assert!(!ok("vpn.corp", "192.168.0.9"));
        assert!(ok("[::1]", "::1"));
        assert!(!ok("localhost", "127.0.0.1"));
        assert!(url_ok(&guard, "http://[::1]:8080/"));
        assert!(!url_ok(&guard, "http://127.0.0.1:8080/"));
    }

    #[test]
    fn loopback_allowance_covers_the_mapped_spellings() {
        let guard = guard(EgressPolicy::allowing_loopback());
        assert!(url_ok(&guard, "http://127.0.0.1:1/"));
        assert!(url_ok(&guard, "http://[::ffff:127.0.0.1]:1/"));
        assert!(url_ok(&guard, "http://[::1]:1/"));
        assert!(
            guard
                .check_address("localhost", "127.0.0.1".parse().unwrap())
                .is_ok()
        );
        assert!(!url_ok(&guard, "http://10.0.0.1/"));
        assert!(EgressPolicy::allowing_loopback().allows_loopback());
        assert!(!EgressPolicy::default().allows_loopback());
    }

    #[test]
    fn host_lists_and_scheme() {
        let guard = guard(EgressPolicy {
            allow_hosts: vec![
                "*.corp.example".into(),
                "api.example.com".into(),
                "203.0.112.0/24".into(),
            ],
            deny_hosts: vec!["secret.corp.example".into(), "8.8.8.0/24".into()],
            https_only: true,
            ..EgressPolicy::default()
        });
        assert!(url_ok(&guard, "https://tickets.corp.example/v1"));
        assert!(url_ok(&guard, "https://api.example.com/"));
        assert!(url_ok(&guard, "https://API.example.com./"));
        assert!(url_ok(&guard, "https://203.0.112.9/"));
        assert!(!url_ok(&guard, "https://corp.example/"));
        assert!(!url_ok(&guard, "https://evilcorp.example/"));
        assert!(!url_ok(&guard, "https://secret.corp.example/"));
        assert!(!url_ok(&guard, "http://api.example.com/"));
        assert!(!url_ok(&guard, "https://1.1.1.1/"));
        assert!(
            guard
                .check_address("api.example.com", "8.8.8.8".parse().unwrap())
                .is_err()
        );
        let err = guard
            .check_url(&Url::parse("https://x.org/?token=abc").unwrap())
            .unwrap_err();
        assert!(!err.to_string().contains("abc"), "{err}");
    }

    #[test]
    fn bad_entries_are_named() {
        let policy = EgressPolicy {
            allow: vec!["10.0.0.0/33".into()],
            ..EgressPolicy::default()
        };
        assert_eq!(
            policy.validate().unwrap_err(),
            "allow: \"10.0.0.0/33\" is not a network (address/prefix)"
        );
        let policy = EgressPolicy {
            deny_hosts: vec!["bad host".into()],
            ..EgressPolicy::default()
        };
        assert_eq!(
            policy.validate().unwrap_err(),
            "deny_hosts: \"bad host\" is not a host name, an address or a network"
        );
        let mut policy = EgressPolicy::default();
        policy.extend_allow(" 10.0.0.0/8, ,db.internal ");
        assert_eq!(policy.allow, ["10.0.0.0/8", "db.internal"]);
        policy.validate().unwrap();
    }

    #[test]
    fn denials_are_found_inside_wrapping_errors() {
        let denied = EgressDenied::new("host x at 127.0.0.1 is a loopback address");
        let wrapped = std::io::Error::other(denied.clone());
        assert_eq!(denial_in(&wrapped), Some(&denied));
        assert_eq!(denial_in(&std::io::Error::other("other")), None);
    }

    #[tokio::test]
    async fn the_resolver_keeps_only_allowed_addresses() {
        let resolver = GuardedResolver::new(Arc::new(guard(EgressPolicy::default())));
        let err = match resolver.resolve(Name::from_str("localhost").unwrap()).await {
            Err(err) => err,
            Ok(addrs) => panic!("localhost resolved to {:?}", addrs.collect::<Vec<_>>()),
        };
        let denied = denial_in(err.as_ref()).expect("an egress denial");
        assert!(denied.message().contains("host localhost at "), "{denied}");
        let resolver = GuardedResolver::new(Arc::new(guard(EgressPolicy::allowing_loopback())));
        let addrs: Vec<SocketAddr> = resolver
            .resolve(Name::from_str("localhost").unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
        assert!(!addrs.is_empty());
    }
}
