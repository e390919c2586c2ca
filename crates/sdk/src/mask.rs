//! Keeping secrets out of text: [`Secrets`] masks the values of a connection — and the forms
//! they take on the wire, base64 and URL-encoded — wherever a step's output, error or log
//! might echo them; [`redact_url`] drops the credentials from a backend URL before it is logged.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::Value;

use crate::PieceAuth;

/// What a masked secret is replaced with.
pub const MASK: &str = "***";

/// The secret strings of a connection, in every form they are looked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Secrets {
    /// Longest first, so a secret that contains another is masked whole.
    needles: Vec<String>,
}

impl Secrets {
    /// The secret parts of `values`, a connection of `auth`'s kind (see
    /// [`PieceAuth::secret_values`]), plus their base64 and URL-encoded forms, and — for any
    /// connection with a `username` and a secret `password` — the base64 of
    /// `username:password`, which an `Authorization: Basic` header carries.
    pub fn of(auth: &PieceAuth, values: &Value) -> Self {
        let secret = auth.secret_values(values);
        let password = values.get("password").and_then(Value::as_str);
        let pair = match (values.get("username").and_then(Value::as_str), password) {
            (Some(user), Some(password)) if secret.contains(&password) => {
                Some(STANDARD.encode(format!("{user}:{password}")))
            }
            _ => None,
        };
        let mut secrets = Self::from_values(secret);
        if let Some(pair) = pair {
            secrets.add_form(pair);
        }
        secrets.sort();
        secrets
    }

    /// Masks exactly these strings and their encoded forms (those shorter than 4 characters
    /// are left out: masking them would garble ordinary text).
    pub fn from_values<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut secrets = Self::default();
        for value in values.into_iter().filter(|v| v.len() >= 4) {
            secrets.add_form(value.to_owned());
            secrets.add_form(STANDARD.encode(value));
            secrets.add_form(URL_SAFE_NO_PAD.encode(value));
            secrets.add_form(form_urlencoded::byte_serialize(value.as_bytes()).collect());
        }
        secrets.sort();
        secrets
    }

    /// Both sets together.
    pub fn merge(mut self, other: &Secrets) -> Self {
        for needle in &other.needles {
            self.add_form(needle.clone());
        }
        self.sort();
        self
    }

    fn add_form(&mut self, form: String) {
        // Padding-free base64 of a short value may be short itself: keep the same floor.
        if form.len() >= 4 && !self.needles.contains(&form) {
            self.needles.push(form);
        }
    }

    fn sort(&mut self) {
        self.needles
            .sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    }

    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// `text` with every secret replaced by [`MASK`]; borrowed when there was none.
    pub fn mask<'t>(&self, text: &'t str) -> Cow<'t, str> {
        let mut out = Cow::Borrowed(text);
        for needle in &self.needles {
            if out.contains(needle.as_str()) {
                out = Cow::Owned(out.replace(needle.as_str(), MASK));
            }
        }
        out
    }

    /// Masks every string in `value`, object keys included.
    pub fn mask_value(&self, value: &mut Value) {
        if self.is_empty() {
            return;
        }
        match value {
            Value::String(text) => {
                if let Cow::Owned(masked) = self.mask(text) {
                    *text = masked;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.mask_value(v)),
            Value::Object(map) => {
                let keys: Vec<String> = map.keys().cloned().collect();
                for key in keys {
                    let Some(mut item) = map.remove(&key) else {
                        continue;
                    };
                    self.mask_value(&mut item);
                    map.insert(self.mask(&key).into_owned(), item);
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
}

/// `url` without the credentials in it (`nats://user:pass@host` → `nats://***@host`), for
/// logs and errors; each of a comma-separated list.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let authority = one.find("://").map_or(0, |i| i + 3);
            let end = one[authority..]
                .find(['/', '?', '#'])
                .map_or(one.len(), |i| authority + i);
            match one[authority..end].rfind('@') {
                Some(at) => format!("{}{MASK}{}", &one[..authority], &one[authority + at..]),
                None => one.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::Prop;

    #[test]
    fn secrets_are_masked_raw_encoded_and_inside_json() {
        let auth = PieceAuth::custom(
            "Key",
            [
                Prop::secret_text("api_key", "API key"),
                Prop::short_text("environment", "Environment"),
            ],
        );
        let secrets = Secrets::of(
            &auth,
            &json!({"api_key": "k/123+456", "environment": "prod"}),
        );
        assert_eq!(secrets.mask("key k/123+456!"), "key ***!");
        assert_eq!(secrets.mask(&STANDARD.encode("k/123+456")), MASK);
        assert_eq!(secrets.mask("token=k%2F123%2B456&x=1"), "token=***&x=1");
        assert_eq!(
            secrets.mask("prod stays"),
            "prod stays",
            "only secret props"
        );
        let mut value =
            json!({"echo": {"Authorization": "Bearer k/123+456"}, "k/123+456": [1, "k/123+456"]});
        secrets.mask_value(&mut value);
        assert_eq!(
            value,
            json!({"echo": {"Authorization": "Bearer ***"}, "***": [1, "***"]})
        );
    }

    #[test]
    fn basic_auth_masks_the_header_form_too() {
        let auth = PieceAuth::basic("Login");
        let secrets = Secrets::of(&auth, &json!({"username": "ada", "password": "hunter22"}));
        let header = format!("Basic {}", STANDARD.encode("ada:hunter22"));
        assert_eq!(secrets.mask(&header), "Basic ***");
        assert_eq!(secrets.mask("user ada"), "user ada");
    }

    #[test]
    fn short_values_and_empty_sets_mask_nothing() {
        let secrets = Secrets::from_values(["abc"]);
        assert!(secrets.is_empty());
        assert!(matches!(secrets.mask("abc"), Cow::Borrowed("abc")));
    }

    #[test]
    fn urls_lose_their_credentials_only() {
        assert_eq!(
            redact_url("nats://user:pa@ss@nats-1:4222,nats://n2:4222"),
            "nats://***@nats-1:4222,nats://n2:4222"
        );
        assert_eq!(
            redact_url("redis://:secret@redis:6379/0"),
            "redis://***@redis:6379/0"
        );
        assert_eq!(
            redact_url("redis://redis:6379/0?user=a@b"),
            "redis://redis:6379/0?user=a@b"
        );
    }
}
