//! Tera rendering with errors that name the template and the cause.

use serde::Serialize;

use crate::error::{Error, Result};

/// Renders `text` (named `name` in messages) with `ctx`. Undefined variables are errors.
pub fn render(name: &str, text: &str, ctx: &impl Serialize) -> Result<String> {
    let mut tera = tera::Tera::default();
    tera.autoescape_on(vec![]);
    tera.add_raw_template(name, text)
        .map_err(|e| terr(name, e))?;
    let ctx = tera::Context::from_serialize(ctx).map_err(|e| terr(name, e))?;
    tera.render(name, &ctx).map_err(|e| terr(name, e))
}

fn terr(name: &str, e: tera::Error) -> Error {
    let mut message = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        message.push_str(": ");
        message.push_str(&s.to_string());
        src = s.source();
    }
    Error::Template {
        name: name.to_string(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_does_not_escape() {
        let ctx = serde_json::json!({"node": {"address": "10.0.0.5"}, "s": "<a&b>"});
        assert_eq!(
            render("t", "bind {{ node.address }} {{ s }}", &ctx).unwrap(),
            "bind 10.0.0.5 <a&b>"
        );
    }

    #[test]
    fn undefined_variable_names_template_and_variable() {
        let e = render(
            "roles/x/firstboot/a.conf.tera",
            "{{ node.nope }}",
            &serde_json::json!({"node": {}}),
        )
        .unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("roles/x/firstboot/a.conf.tera") && m.contains("node.nope"),
            "{m}"
        );
    }

    #[test]
    fn syntax_error_is_reported() {
        assert!(render("t", "{% if %}", &serde_json::json!({})).is_err());
    }
}
