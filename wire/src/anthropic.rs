//! OpenAI's chat completions spoken to Anthropic's Messages API: the app
//! always speaks OpenAI, so a request bound for an `anthropic` endpoint is
//! rewritten into a Messages request ([`request`]), and what comes back is
//! rewritten into OpenAI's shapes: a whole answer ([`answer`]), an error
//! answer ([`error_body`]), or a stream, event by event as it arrives
//! ([`Stream`]).
//!
//! Pure functions over bytes, like the rest of the crate; the proxy sets
//! the headers (`x-api-key`, `anthropic-version`: see the policy crate's
//! `ApiKind`, which the control plane's probes share).
//!
//! What OpenAI has and Anthropic has not is dropped when dropping it keeps
//! the answer the app asked for (`n: 1`, `seed`, a `text` response format,
//! penalties, `logprobs`, `stream_options`, `top_p` beside `temperature`),
//! and refused when it cannot be honoured (`n` > 1, a JSON response format,
//! audio or file parts). What Anthropic has and OpenAI
//! has not (thinking blocks, server tools) is left out of the answer.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::chat::Invalid;
use crate::sse::{self, Boundaries};
use crate::usage::Tokens;

/// An Anthropic answer the sidecar cannot turn into OpenAI's shape; the
/// message says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("untranslatable Anthropic answer: {0}")]
pub struct Untranslatable(pub String);

// ---------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------

fn invalid(param: impl Into<Cow<'static, str>>, code: &'static str, message: String) -> Invalid {
    Invalid {
        param: Some(param.into()),
        code: Some(code),
        message,
    }
}

/// The type of a JSON value as OpenAI's messages name it.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a decimal",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(param: impl Into<Cow<'static, str>>, expected: &str, got: &Value) -> Invalid {
    let param = param.into();
    let message = format!(
        "Invalid type for '{param}': expected {expected}, but got {} instead.",
        type_name(got)
    );
    invalid(param, "invalid_type", message)
}

fn missing(param: impl Into<Cow<'static, str>>) -> Invalid {
    let param = param.into();
    let message = format!("Missing required parameter: '{param}'.");
    invalid(param, "missing_required_parameter", message)
}

fn unsupported(param: impl Into<Cow<'static, str>>, why: &str) -> Invalid {
    let param = param.into();
    let message = format!("Invalid '{param}': {why}");
    invalid(param, "unsupported_value", message)
}

/// The required string `key` of `o`, named `param` in errors.
fn string_at<'a>(
    o: &'a Map<String, Value>,
    key: &str,
    param: String,
) -> Result<&'a String, Invalid> {
    match o.get(key) {
        Some(Value::String(v)) => Ok(v),
        None | Some(Value::Null) => Err(missing(param)),
        Some(other) => Err(wrong_type(param, "a string", other)),
    }
}

/// The required object `key` of `o`, named `param` in errors.
fn object_at<'a>(
    o: &'a Map<String, Value>,
    key: &str,
    param: String,
) -> Result<&'a Map<String, Value>, Invalid> {
    match o.get(key) {
        Some(Value::Object(v)) => Ok(v),
        None | Some(Value::Null) => Err(missing(param)),
        Some(other) => Err(wrong_type(param, "an object", other)),
    }
}

/// Present and not null.
fn given<'a>(o: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    o.get(key).filter(|v| !v.is_null())
}

/// One turn of the conversation being built: Anthropic wants turns that
/// alternate, so consecutive messages landing on the same role share one.
struct Turn {
    role: &'static str,
    blocks: Vec<Value>,
}

fn text_block(text: &str) -> Value {
    serde_json::json!({"type": "text", "text": text})
}

/// The text of a `content` that may only hold text: a string, or text
/// parts (joined as they come). `None` for null.
fn text_only(content: Option<&Value>, param: &str) -> Result<Option<String>, Invalid> {
    match content {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                let here = format!("{param}[{j}]");
                match part_type(p, &here)? {
                    "text" => out.push_str(part_text(p, &here)?),
                    other => {
                        return Err(unsupported(
                            format!("{here}.type"),
                            &format!("only text parts are supported here, not '{other}'."),
                        ))
                    }
                }
            }
            Ok(Some(out))
        }
        Some(other) => Err(wrong_type(param.to_owned(), "a string or an array", other)),
    }
}

fn part_type<'a>(p: &'a Value, param: &str) -> Result<&'a str, Invalid> {
    let Value::Object(o) = p else {
        return Err(wrong_type(param.to_owned(), "an object", p));
    };
    match o.get("type") {
        Some(Value::String(t)) => Ok(t),
        None | Some(Value::Null) => Err(missing(format!("{param}.type"))),
        Some(other) => Err(wrong_type(format!("{param}.type"), "a string", other)),
    }
}

fn part_text<'a>(p: &'a Value, param: &str) -> Result<&'a str, Invalid> {
    match p.get("text") {
        Some(Value::String(t)) => Ok(t),
        None | Some(Value::Null) => Err(missing(format!("{param}.text"))),
        Some(other) => Err(wrong_type(format!("{param}.text"), "a string", other)),
    }
}

/// An `image_url` part as an image block: a `data:` URL becomes base64
/// source, an http(s) URL a URL source (Anthropic fetches it).
fn image_block(p: &Value, param: &str) -> Result<Value, Invalid> {
    let here = format!("{param}.image_url");
    // Some clients send the URL itself rather than `{"url": ...}`.
    let url = match p.get("image_url") {
        Some(Value::String(u)) => u.as_str(),
        Some(Value::Object(o)) => string_at(o, "url", format!("{here}.url"))?.as_str(),
        None | Some(Value::Null) => return Err(missing(here)),
        Some(other) => return Err(wrong_type(here, "an object", other)),
    };
    if let Some(rest) = url.strip_prefix("data:") {
        let bad = || {
            invalid(
                format!("{here}.url"),
                "invalid_value",
                format!(
                    "Invalid '{here}.url': a data URL must be 'data:<media type>;base64,<data>'."
                ),
            )
        };
        let (head, data) = rest.split_once(',').ok_or_else(bad)?;
        let head = head.strip_suffix(";base64").ok_or_else(bad)?;
        // Parameters such as `;charset=` are not Anthropic's business.
        let media = head.split(';').next().unwrap_or_default();
        if media.is_empty() {
            return Err(bad());
        }
        return Ok(serde_json::json!({"type": "image", "source":
            {"type": "base64", "media_type": media, "data": data}}));
    }
    let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
    if matches!(scheme.as_deref(), Some("http" | "https")) {
        return Ok(serde_json::json!({"type": "image", "source": {"type": "url", "url": url}}));
    }
    Err(invalid(
        format!("{here}.url"),
        "invalid_value",
        format!("Invalid '{here}.url': expected an http(s) URL or a base64 data URL."),
    ))
}

/// A user or assistant `content` as blocks. Empty text is left out:
/// Anthropic refuses empty text blocks, and OpenAI clients send `""`
/// beside tool calls.
fn content_blocks(
    content: Option<&Value>,
    param: &str,
    out: &mut Vec<Value>,
) -> Result<(), Invalid> {
    match content {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) => {
            if !s.is_empty() {
                out.push(text_block(s));
            }
            Ok(())
        }
        Some(Value::Array(parts)) => {
            for (j, p) in parts.iter().enumerate() {
                let here = format!("{param}[{j}]");
                match part_type(p, &here)? {
                    // A refusal the assistant gave earlier is what it said.
                    t @ ("text" | "refusal") => {
                        let text = if t == "text" {
                            part_text(p, &here)?
                        } else {
                            match p.get("refusal") {
                                Some(Value::String(r)) => r,
                                _ => return Err(missing(format!("{here}.refusal"))),
                            }
                        };
                        if !text.is_empty() {
                            out.push(text_block(text));
                        }
                    }
                    "image_url" => out.push(image_block(p, &here)?),
                    other => {
                        return Err(unsupported(
                            format!("{here}.type"),
                            &format!(
                                "content parts of type '{other}' cannot be sent to this provider."
                            ),
                        ))
                    }
                }
            }
            Ok(())
        }
        Some(other) => Err(wrong_type(param.to_owned(), "a string or an array", other)),
    }
}

/// An assistant's `tool_calls` as `tool_use` blocks.
fn tool_uses(calls: &Value, param: &str, out: &mut Vec<Value>) -> Result<(), Invalid> {
    let Value::Array(calls) = calls else {
        return Err(wrong_type(param.to_owned(), "an array", calls));
    };
    for (j, c) in calls.iter().enumerate() {
        let here = format!("{param}[{j}]");
        let Value::Object(c) = c else {
            return Err(wrong_type(here, "an object", c));
        };
        let id = string_at(c, "id", format!("{here}.id"))?;
        let f = object_at(c, "function", format!("{here}.function"))?;
        let name = string_at(f, "name", format!("{here}.function.name"))?;
        let args_param = format!("{here}.function.arguments");
        let input = match f.get("arguments") {
            // A call without arguments: OpenAI clients send "" or nothing.
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(Value::String(a)) if a.trim().is_empty() => Value::Object(Map::new()),
            Some(Value::String(a)) => match serde_json::from_str::<Value>(a) {
                Ok(v @ Value::Object(_)) => v,
                Ok(_) => {
                    return Err(invalid(
                        args_param.clone(),
                        "invalid_value",
                        format!("Invalid '{args_param}': the arguments must be a JSON object."),
                    ))
                }
                Err(e) => {
                    return Err(invalid(
                        args_param.clone(),
                        "invalid_value",
                        format!("Invalid '{args_param}': not valid JSON: {e}"),
                    ))
                }
            },
            Some(other) => return Err(wrong_type(args_param, "a string", other)),
        };
        out.push(serde_json::json!({"type": "tool_use", "id": id, "name": name, "input": input}));
    }
    Ok(())
}

/// `messages` as Anthropic's `system` and turns.
fn conversation(messages: &Value) -> Result<(Vec<String>, Vec<Turn>), Invalid> {
    let list = match messages {
        Value::Array(l) => l,
        Value::Null => return Err(missing("messages")),
        other => return Err(wrong_type("messages", "an array", other)),
    };
    let mut system = Vec::new();
    let mut turns: Vec<Turn> = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(wrong_type(format!("messages[{i}]"), "an object", m));
        };
        let role = string_at(m, "role", format!("messages[{i}].role"))?.as_str();
        let content = format!("messages[{i}].content");
        let (role, blocks) = match role {
            "system" | "developer" => {
                if let Some(t) = text_only(m.get("content"), &content)? {
                    if !t.is_empty() {
                        system.push(t);
                    }
                }
                continue;
            }
            "user" => {
                let mut b = Vec::new();
                content_blocks(m.get("content"), &content, &mut b)?;
                ("user", b)
            }
            "assistant" => {
                let mut b = Vec::new();
                content_blocks(m.get("content"), &content, &mut b)?;
                if let Some(calls) = given(m, "tool_calls") {
                    tool_uses(calls, &format!("messages[{i}].tool_calls"), &mut b)?;
                }
                ("assistant", b)
            }
            "tool" => {
                let id = match m.get("tool_call_id") {
                    Some(Value::String(id)) => id,
                    None | Some(Value::Null) => {
                        return Err(missing(format!("messages[{i}].tool_call_id")))
                    }
                    Some(other) => {
                        return Err(wrong_type(
                            format!("messages[{i}].tool_call_id"),
                            "a string",
                            other,
                        ))
                    }
                };
                let mut block = serde_json::json!({"type": "tool_result", "tool_use_id": id});
                // An empty result is sent without content: Anthropic refuses
                // empty text.
                if let Some(text) = text_only(m.get("content"), &content)?.filter(|t| !t.is_empty())
                {
                    if let Some(o) = block.as_object_mut() {
                        o.insert("content".into(), text.into());
                    }
                }
                ("user", vec![block])
            }
            other => {
                return Err(invalid(
                    format!("messages[{i}].role"),
                    "invalid_value",
                    format!(
                        "Invalid 'messages[{i}].role': '{other}' cannot be sent to this provider; \
                         expected 'system', 'developer', 'user', 'assistant' or 'tool'."
                    ),
                ))
            }
        };
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some(t) if t.role == role => t.blocks.extend(blocks),
            _ => turns.push(Turn { role, blocks }),
        }
    }
    Ok((system, turns))
}

fn turn_json(t: Turn) -> Value {
    // One text block reads best, and is smallest, as a plain string.
    let content = match t.blocks.as_slice() {
        [one] if one.get("type").and_then(Value::as_str) == Some("text") => {
            one.get("text").cloned().unwrap_or(Value::Null)
        }
        _ => Value::Array(t.blocks),
    };
    serde_json::json!({"role": t.role, "content": content})
}

/// `tools` as Anthropic's.
fn tools(v: &Value) -> Result<Vec<Value>, Invalid> {
    let Value::Array(list) = v else {
        return Err(wrong_type("tools", "an array", v));
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let here = format!("tools[{i}]");
        let Value::Object(t) = t else {
            return Err(wrong_type(here, "an object", t));
        };
        match t.get("type") {
            Some(Value::String(k)) if k == "function" => {}
            None | Some(Value::Null) => return Err(missing(format!("{here}.type"))),
            Some(Value::String(k)) => {
                return Err(unsupported(
                    format!("{here}.type"),
                    &format!("tools of type '{k}' cannot be sent to this provider."),
                ))
            }
            Some(other) => return Err(wrong_type(format!("{here}.type"), "a string", other)),
        }
        let f = object_at(t, "function", format!("{here}.function"))?;
        let name = string_at(f, "name", format!("{here}.function.name"))?;
        let mut tool = Map::new();
        tool.insert("name".into(), name.clone().into());
        match given(f, "description") {
            Some(Value::String(d)) => {
                tool.insert("description".into(), d.clone().into());
            }
            None => {}
            Some(other) => {
                return Err(wrong_type(
                    format!("{here}.function.description"),
                    "a string",
                    other,
                ))
            }
        }
        let schema = match given(f, "parameters") {
            Some(p @ Value::Object(_)) => p.clone(),
            None => serde_json::json!({"type": "object"}),
            Some(other) => {
                return Err(wrong_type(
                    format!("{here}.function.parameters"),
                    "an object",
                    other,
                ))
            }
        };
        tool.insert("input_schema".into(), schema);
        out.push(Value::Object(tool));
    }
    Ok(out)
}

/// `tool_choice` as Anthropic's.
fn tool_choice(v: &Value) -> Result<Map<String, Value>, Invalid> {
    let kind = |k: &str| {
        let mut m = Map::new();
        m.insert("type".into(), k.into());
        m
    };
    match v {
        Value::String(s) => match s.as_str() {
            "auto" => Ok(kind("auto")),
            "none" => Ok(kind("none")),
            "required" => Ok(kind("any")),
            other => Err(invalid(
                "tool_choice",
                "invalid_value",
                format!("Invalid 'tool_choice': '{other}'; expected 'none', 'auto' or 'required'."),
            )),
        },
        Value::Object(o) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| missing("tool_choice.function.name"))?;
            let mut m = kind("tool");
            m.insert("name".into(), name.into());
            Ok(m)
        }
        other => Err(wrong_type("tool_choice", "a string or an object", other)),
    }
}

/// A non-negative integer parameter.
fn count(o: &Map<String, Value>, key: &'static str) -> Result<Option<u64>, Invalid> {
    match given(o, key) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(n) => Ok(Some(n)),
            None if n.as_i64().is_some() => Err(invalid(
                key,
                "integer_below_min_value",
                format!("Invalid '{key}': integer below minimum value. Expected a value >= 0, but got {n} instead."),
            )),
            None => Err(wrong_type(key, "an integer", &Value::Number(n.clone()))),
        },
        Some(other) => Err(wrong_type(key, "an integer", other)),
    }
}

fn number(o: &Map<String, Value>, key: &'static str) -> Result<Option<f64>, Invalid> {
    match given(o, key) {
        None => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(wrong_type(key, "a number", other)),
    }
}

/// An OpenAI chat completion request body -> an Anthropic Messages request
/// body. `model`: the id to send (already mapped by the caller);
/// `default_max_tokens`: used when the request has neither `max_tokens`
/// nor `max_completion_tokens` (Anthropic requires it).
pub fn request(openai_body: &[u8], model: &str, default_max_tokens: u32) -> Result<Bytes, Invalid> {
    let v: Value = serde_json::from_slice(openai_body).map_err(|e| Invalid {
        param: None,
        code: None,
        message: format!("The request body is not valid JSON: {e}"),
    })?;
    let Value::Object(o) = v else {
        return Err(Invalid {
            param: None,
            code: None,
            message: "The request body is not valid JSON: the body must be a JSON object".into(),
        });
    };
    let mut out = Map::new();
    out.insert("model".into(), model.into());

    match count(&o, "n")? {
        None | Some(1) => {}
        Some(n) => {
            return Err(unsupported(
                "n",
                &format!("this provider gives one choice per request, {n} were asked for."),
            ))
        }
    }

    let (system, turns) = conversation(o.get("messages").unwrap_or(&Value::Null))?;
    if turns.is_empty() {
        return Err(invalid(
            "messages",
            "invalid_value",
            "Invalid 'messages': this provider needs at least one user or assistant message with content.".into(),
        ));
    }
    if !system.is_empty() {
        out.insert("system".into(), system.join("\n\n").into());
    }
    out.insert(
        "messages".into(),
        Value::Array(turns.into_iter().map(turn_json).collect()),
    );

    let max = count(&o, "max_tokens")?.or(count(&o, "max_completion_tokens")?);
    out.insert(
        "max_tokens".into(),
        max.unwrap_or(u64::from(default_max_tokens)).into(),
    );

    match given(&o, "stop") {
        None => {}
        // Anthropic refuses empty stop sequences; they stop nothing anyway.
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), vec![s.clone()].into());
        }
        Some(Value::Array(list)) => {
            let mut seqs = Vec::with_capacity(list.len());
            for (i, s) in list.iter().enumerate() {
                match s {
                    Value::String(s) if s.is_empty() => {}
                    Value::String(s) => seqs.push(Value::from(s.clone())),
                    other => return Err(wrong_type(format!("stop[{i}]"), "a string", other)),
                }
            }
            if !seqs.is_empty() {
                out.insert("stop_sequences".into(), Value::Array(seqs));
            }
        }
        Some(other) => return Err(wrong_type("stop", "a string or an array", other)),
    }

    // OpenAI's temperature runs 0..2, Anthropic's 0..1, and Anthropic
    // refuses more than 1. Both mean "1 is the model's own distribution",
    // so what is at most 1 is passed as it is, and hotter asks get the
    // hottest Anthropic allows rather than a 400 for a request the app
    // had every right to send.
    let temperature = number(&o, "temperature")?;
    if let Some(t) = temperature {
        out.insert("temperature".into(), t.clamp(0.0, 1.0).into());
    }
    // Recent Claude models refuse `temperature` and `top_p` together, and
    // OpenAI clients often send both (at their defaults): the temperature
    // is kept, the one Anthropic recommends adjusting.
    if let Some(p) = number(&o, "top_p")?.filter(|_| temperature.is_none()) {
        out.insert("top_p".into(), p.into());
    }
    // A format the app relies on cannot be promised by a model that is
    // only asked nicely: refused, so the request goes where it can be kept.
    match given(&o, "response_format") {
        None => {}
        Some(Value::Object(f)) if f.get("type").and_then(Value::as_str) == Some("text") => {}
        Some(Value::Object(f)) => {
            let kind = f.get("type").and_then(Value::as_str).unwrap_or("?");
            return Err(unsupported(
                "response_format",
                &format!("a '{kind}' response format cannot be promised by this provider."),
            ));
        }
        Some(other) => return Err(wrong_type("response_format", "an object", other)),
    }
    match given(&o, "stream") {
        None => {}
        Some(Value::Bool(b)) => {
            out.insert("stream".into(), (*b).into());
        }
        Some(other) => return Err(wrong_type("stream", "a boolean", other)),
    }

    let tool_list = match given(&o, "tools") {
        None => Vec::new(),
        Some(t) => tools(t)?,
    };
    let mut choice = match given(&o, "tool_choice") {
        None => None,
        Some(c) => Some(tool_choice(c)?),
    };
    match given(&o, "parallel_tool_calls") {
        None | Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => {
            let c = choice.get_or_insert_with(|| {
                let mut m = Map::new();
                m.insert("type".into(), "auto".into());
                m
            });
            // `none` has no such flag: no tool is called at all.
            if c.get("type").and_then(Value::as_str) != Some("none") {
                c.insert("disable_parallel_tool_use".into(), true.into());
            }
        }
        Some(other) => return Err(wrong_type("parallel_tool_calls", "a boolean", other)),
    }
    // A tool choice without tools means nothing, and Anthropic refuses it.
    if !tool_list.is_empty() {
        out.insert("tools".into(), Value::Array(tool_list));
        if let Some(c) = choice {
            out.insert("tool_choice".into(), Value::Object(c));
        }
    }

    match given(&o, "user") {
        None => {}
        Some(Value::String(u)) => {
            out.insert("metadata".into(), serde_json::json!({"user_id": u}));
        }
        Some(other) => return Err(wrong_type("user", "a string", other)),
    }

    serde_json::to_vec(&Value::Object(out))
        .map(Bytes::from)
        .map_err(|e| Invalid {
            param: None,
            code: None,
            message: format!("The request could not be written for the provider: {e}"),
        })
}

// ---------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------

/// Anthropic's `usage`, in an answer, `message_start` or `message_delta`
/// (where every field is optional and cumulative).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
struct UsageIn {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
}

/// Usage as Anthropic counts it: `input` excludes the cached tokens.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    input: u64,
    output: u64,
    cache_read: u64,
    cache_write: u64,
}

impl Usage {
    fn update(&mut self, u: &UsageIn) {
        if let Some(n) = u.input_tokens {
            self.input = n;
        }
        if let Some(n) = u.output_tokens {
            self.output = n;
        }
        if let Some(n) = u.cache_read_input_tokens {
            self.cache_read = n;
        }
        if let Some(n) = u.cache_creation_input_tokens {
            self.cache_write = n;
        }
    }

    /// As [`Tokens`]: OpenAI's prompt tokens include the cached ones.
    fn tokens(&self) -> Tokens {
        Tokens {
            input: self
                .input
                .saturating_add(self.cache_read)
                .saturating_add(self.cache_write),
            output: self.output,
            cached_input: self.cache_read,
            cache_write: self.cache_write,
        }
    }

    fn openai(&self) -> UsageOut {
        let t = self.tokens();
        UsageOut {
            prompt_tokens: t.input,
            completion_tokens: t.output,
            total_tokens: t.input.saturating_add(t.output),
            prompt_tokens_details: Details {
                cached_tokens: t.cached_input,
            },
        }
    }
}

#[derive(Serialize)]
struct UsageOut {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: Details,
}

#[derive(Serialize)]
struct Details {
    cached_tokens: u64,
}

/// Anthropic's `stop_reason` as OpenAI's `finish_reason`. A reason
/// Anthropic adds later is an ordinary end, as `pause_turn` is.
fn finish_reason(stop: &str) -> &'static str {
    match stop {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

#[derive(Deserialize)]
struct AnswerIn {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    content: Vec<Value>,
    #[serde(default)]
    stop_reason: Option<String>,
    usage: UsageIn,
}

#[derive(Serialize)]
struct ToolCallOut<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionOut<'a>,
}

#[derive(Serialize)]
struct FunctionOut<'a> {
    name: &'a str,
    arguments: String,
}

#[derive(Serialize)]
struct AnswerOut<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [ChoiceOut<'a>; 1],
    usage: UsageOut,
}

#[derive(Serialize)]
struct ChoiceOut<'a> {
    index: u32,
    message: MessageOut<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct MessageOut<'a> {
    role: &'static str,
    content: Option<String>,
    refusal: Option<()>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCallOut<'a>>,
}

/// A whole non-streamed Anthropic answer (2xx) -> OpenAI `chat.completion`
/// JSON, and its usage. `created`: the Unix time to stamp it with
/// (Anthropic's answers carry none).
pub fn answer(body: &[u8], created: u64) -> Result<(Bytes, Tokens), Untranslatable> {
    let a: AnswerIn = serde_json::from_slice(body)
        .map_err(|e| Untranslatable(format!("not a Messages answer: {e}")))?;
    if let Some(k) = a.kind.as_deref().filter(|k| *k != "message") {
        return Err(Untranslatable(format!(
            "an answer of type '{k}', not 'message'"
        )));
    }
    let mut text: Option<String> = None;
    let mut calls = Vec::new();
    for block in &a.content {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => {
                let t = block
                    .get("text")
                    .and_then(Value::as_str)
                    .ok_or_else(|| Untranslatable("a text block without its text".into()))?;
                text.get_or_insert_with(String::new).push_str(t);
            }
            Some("tool_use") => {
                let field = |k: &str| {
                    block
                        .get(k)
                        .and_then(Value::as_str)
                        .ok_or_else(|| Untranslatable(format!("a tool_use block without its {k}")))
                };
                let input = block.get("input").unwrap_or(&Value::Null);
                let arguments = match input {
                    Value::Null => "{}".to_owned(),
                    v => serde_json::to_string(v)
                        .map_err(|e| Untranslatable(format!("a tool input: {e}")))?,
                };
                calls.push(ToolCallOut {
                    id: field("id")?,
                    kind: "function",
                    function: FunctionOut {
                        name: field("name")?,
                        arguments,
                    },
                });
            }
            // Thinking, redacted thinking, server tool blocks: OpenAI's
            // chat completion has no place for them.
            _ => {}
        }
    }
    let mut usage = Usage::default();
    usage.update(&a.usage);
    let out = AnswerOut {
        id: &a.id,
        object: "chat.completion",
        created,
        model: &a.model,
        choices: [ChoiceOut {
            index: 0,
            message: MessageOut {
                role: "assistant",
                content: text,
                refusal: None,
                tool_calls: calls,
            },
            logprobs: None,
            finish_reason: a.stop_reason.as_deref().map(finish_reason),
        }],
        usage: usage.openai(),
    };
    let json = serde_json::to_vec(&out).map_err(|e| Untranslatable(e.to_string()))?;
    Ok((Bytes::from(json), usage.tokens()))
}

#[derive(Deserialize)]
struct ErrorIn {
    #[serde(rename = "type")]
    kind: String,
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "type")]
    kind: String,
    message: String,
}

#[derive(Serialize)]
struct ErrorOut<'a> {
    error: ErrorOutInner<'a>,
}

#[derive(Serialize)]
struct ErrorOutInner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<()>,
    code: Option<()>,
}

fn error_json(kind: &str, message: &str) -> Vec<u8> {
    let e = ErrorOut {
        error: ErrorOutInner {
            message,
            kind,
            param: None,
            code: None,
        },
    };
    // Serialising strings into a Vec cannot fail.
    serde_json::to_vec(&e).unwrap_or_default()
}

/// An Anthropic error answer body (`{"type":"error","error":{"type",
/// "message"}}`) -> OpenAI error JSON (`{"error":{"message","type",
/// "param":null,"code":null}}`). Anthropic's error type is kept as the
/// type (`rate_limit_error`, `overloaded_error`, `invalid_request_error`:
/// OpenAI clients show the type, they do not branch on it; they branch on
/// the status, which the proxy keeps). For a body that is not Anthropic's
/// error shape, an error that says the provider answered `status` with an
/// unreadable body.
pub fn error_body(status: u16, body: &[u8]) -> Bytes {
    match serde_json::from_slice::<ErrorIn>(body) {
        Ok(e) if e.kind == "error" => Bytes::from(error_json(&e.error.kind, &e.error.message)),
        _ => {
            let kind = match status {
                429 => "rate_limit_error",
                s if s >= 500 => "server_error",
                _ => "invalid_request_error",
            };
            let message = format!(
                "The provider answered {status} with a body that is not an Anthropic error."
            );
            Bytes::from(error_json(kind, &message))
        }
    }
}

/// The HTTP status Anthropic answers an error of type `kind` with, for an
/// error that arrives inside a stream (after the 200): what the proxy then
/// counts it as (`overloaded_error` 529 and `rate_limit_error` 429 are
/// failures to fail over, like their statuses before a stream).
pub fn status_of(kind: &str) -> u16 {
    match kind {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "overloaded_error" => 529,
        _ => 500,
    }
}

// ---------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// An event larger than this is not held: the stream fails (Anthropic's
/// events are small; a stream that never ends an event is broken).
pub const MAX_EVENT: usize = crate::sse::MAX_HELD;

/// Anthropic's stream events, as far as they are translated.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum EventIn {
    MessageStart {
        message: StartIn,
    },
    ContentBlockStart {
        index: u64,
        content_block: BlockIn,
    },
    ContentBlockDelta {
        index: u64,
        delta: DeltaIn,
    },
    MessageDelta {
        #[serde(default)]
        delta: MessageDeltaIn,
        #[serde(default)]
        usage: Option<UsageIn>,
    },
    ContentBlockStop {
        index: u64,
    },
    MessageStop,
    Ping,
    Error {
        error: ErrorDetail,
    },
    /// Whatever Anthropic adds later.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct StartIn {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    usage: Option<UsageIn>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockIn {
    Text {
        #[serde(default)]
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        /// Usually `{}`, the arguments following as deltas; a server that
        /// sends them whole here sends no deltas.
        #[serde(default)]
        input: Option<Value>,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum DeltaIn {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    /// Thinking and signature deltas (reasoning OpenAI's chunk has no
    /// field for), citations, and whatever comes later.
    #[serde(other)]
    Other,
}

#[derive(Deserialize, Default)]
struct MessageDeltaIn {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Serialize)]
struct ChunkOut<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [ChunkChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageOut>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: DeltaOut<'a>,
    /// Always null, as OpenAI sends it when none were asked for.
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct DeltaOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolDelta<'a>; 1]>,
}

#[derive(Serialize)]
struct ToolDelta<'a> {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: FunctionDelta<'a>,
}

#[derive(Serialize)]
struct FunctionDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}

/// Anthropic's SSE stream -> OpenAI `chat.completion.chunk` SSE, one event
/// out per event in, as they arrive (see the module docs). Events are
/// found with [`Boundaries`], so any line ending and any split of the
/// reads work; what is written ends its lines with LF.
#[derive(Debug)]
pub struct Stream {
    bounds: Boundaries,
    held: BytesMut,
    started: bool,
    created: u64,
    id: String,
    model: String,
    usage: Option<Usage>,
    /// The tool_use blocks: content block index, tool call index, and
    /// whether any of its arguments went out.
    tools: Vec<(u64, usize, bool)>,
    /// Something of the answer itself went out: text, a tool call, or
    /// the end of the message (not only `message_start` or pings).
    begun: bool,
    /// An error event's type and message.
    failed: Option<(String, String)>,
    complete: bool,
}

impl Stream {
    /// `created`: the Unix time every chunk is stamped with (Anthropic's
    /// events carry none).
    pub fn new(created: u64) -> Self {
        Self {
            bounds: Boundaries::default(),
            held: BytesMut::new(),
            started: false,
            created,
            id: String::new(),
            model: String::new(),
            usage: None,
            tools: Vec::new(),
            begun: false,
            failed: None,
            complete: false,
        }
    }

    /// Takes a read of the upstream body (any split, any SSE line ending);
    /// returns the OpenAI SSE bytes for every whole event in it (whole
    /// events only; partial ones are held).
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        let mut out = BytesMut::new();
        let mut pos = usize::from(self.bounds.owes_lf(&chunk));
        while let Some(len) = self.bounds.find_end(chunk.get(pos..).unwrap_or_default()) {
            let end = pos + len;
            let piece = chunk.get(pos..end).unwrap_or_default();
            if self.held.is_empty() {
                self.event(piece, &mut out);
            } else {
                self.held.extend_from_slice(piece);
                let event = self.held.split().freeze();
                self.event(&event, &mut out);
            }
            pos = end;
        }
        let tail = chunk.get(pos..).unwrap_or_default();
        if self.held.len() + tail.len() > MAX_EVENT {
            self.held.clear();
            self.fail(
                "api_error",
                "the provider sent an event too large to read",
                &mut out,
            );
        } else {
            self.held.extend_from_slice(tail);
        }
        out.freeze()
    }

    /// At the upstream body's clean end: anything still to send. An event
    /// the provider did not close with an empty line is translated when
    /// its data is whole JSON (the last one, `message_stop`, is what such
    /// a provider leaves open).
    pub fn end(&mut self) -> Bytes {
        let mut out = BytesMut::new();
        if !self.held.is_empty() {
            let event = self.held.split().freeze();
            self.event(&event, &mut out);
        }
        out.freeze()
    }

    /// Usage seen so far (`message_start` input, `message_delta` output),
    /// `None` before `message_start`.
    pub fn tokens(&self) -> Option<Tokens> {
        self.usage.map(|u| u.tokens())
    }

    /// An `error` event arrived (its OpenAI-shaped error event was already
    /// emitted): its message.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_ref().map(|(_, message)| message.as_str())
    }

    /// The type of the error event that ended the stream
    /// (`overloaded_error`, `rate_limit_error`, `api_error`, ...).
    pub fn failure_kind(&self) -> Option<&str> {
        self.failed.as_ref().map(|(kind, _)| kind.as_str())
    }

    /// Whether the answer itself has begun: a token, a tool call or the
    /// message's end went out, not only its start. Until then a stream
    /// that fails has told the app nothing it needs.
    pub fn begun(&self) -> bool {
        self.begun
    }

    /// The stream ended properly (`message_stop` seen).
    pub fn complete(&self) -> bool {
        self.complete
    }

    fn event(&mut self, event: &[u8], out: &mut BytesMut) {
        let event = if self.started {
            event
        } else {
            self.started = true;
            event.strip_prefix(BOM).unwrap_or(event)
        };
        // After the end or an error, nothing more goes to the app: it
        // already has its terminating event.
        if self.complete || self.failed.is_some() {
            return;
        }
        let Some(data) = sse::data(event) else {
            return;
        };
        // An event that is not one of Anthropic's, or one it changed
        // beyond reading, is passed over: the ones that matter (the end,
        // errors) are checked by `complete` and `failed`.
        let Ok(e) = serde_json::from_slice::<EventIn>(&data) else {
            return;
        };
        match e {
            EventIn::MessageStart { message } => {
                self.id = message.id;
                self.model = message.model;
                let mut u = Usage::default();
                if let Some(m) = &message.usage {
                    u.update(m);
                }
                self.usage = Some(u);
                self.chunk(
                    DeltaOut {
                        role: Some("assistant"),
                        content: Some(""),
                        ..DeltaOut::default()
                    },
                    None,
                    out,
                );
            }
            EventIn::ContentBlockStart {
                index,
                content_block,
            } => match content_block {
                BlockIn::Text { text } if !text.is_empty() => {
                    self.begun = true;
                    self.chunk(
                        DeltaOut {
                            content: Some(&text),
                            ..DeltaOut::default()
                        },
                        None,
                        out,
                    )
                }
                BlockIn::ToolUse { id, name, input } => {
                    self.begun = true;
                    let k = self.tools.len();
                    // Arguments given whole at the start (not the usual
                    // empty object the deltas then fill) go out with it.
                    let whole = input
                        .filter(|v| v.as_object().is_none_or(|o| !o.is_empty()))
                        .map(|v| v.to_string());
                    self.tools.push((index, k, whole.is_some()));
                    self.chunk(
                        DeltaOut {
                            tool_calls: Some([ToolDelta {
                                index: k,
                                id: Some(&id),
                                kind: Some("function"),
                                function: FunctionDelta {
                                    name: Some(&name),
                                    arguments: whole.as_deref().unwrap_or(""),
                                },
                            }]),
                            ..DeltaOut::default()
                        },
                        None,
                        out,
                    );
                }
                _ => {}
            },
            EventIn::ContentBlockDelta { index, delta } => match delta {
                DeltaIn::TextDelta { text } => {
                    self.begun = true;
                    self.chunk(
                        DeltaOut {
                            content: Some(&text),
                            ..DeltaOut::default()
                        },
                        None,
                        out,
                    )
                }
                DeltaIn::InputJsonDelta { partial_json } => {
                    let Some((_, k, sent)) = self.tools.iter_mut().find(|(b, _, _)| *b == index)
                    else {
                        return;
                    };
                    let k = *k;
                    *sent |= !partial_json.is_empty();
                    self.arguments(k, &partial_json, out);
                }
                DeltaIn::Other => {}
            },
            EventIn::ContentBlockStop { index } => {
                // A tool that takes no arguments gets `{}`, as in a whole
                // answer, so the app's pieces add up to JSON.
                let Some((_, k, sent)) = self.tools.iter_mut().find(|(b, _, _)| *b == index) else {
                    return;
                };
                if *sent {
                    return;
                }
                *sent = true;
                let k = *k;
                self.arguments(k, "{}", out);
            }
            EventIn::MessageDelta { delta, usage } => {
                self.begun = true;
                if let Some(u) = &usage {
                    self.usage.get_or_insert_with(Usage::default).update(u);
                }
                let finish = delta.stop_reason.as_deref().map(finish_reason);
                self.chunk(DeltaOut::default(), finish, out);
            }
            EventIn::MessageStop => {
                self.complete = true;
                let usage = self.usage.unwrap_or_default().openai();
                let c = ChunkOut {
                    id: &self.id,
                    object: "chat.completion.chunk",
                    created: self.created,
                    model: &self.model,
                    choices: &[],
                    usage: Some(usage),
                };
                write_event(&c, out);
                out.extend_from_slice(b"data: [DONE]\n\n");
            }
            EventIn::Ping => out.extend_from_slice(b": ping\n\n"),
            EventIn::Error { error } => self.fail(&error.kind, &error.message, out),
            EventIn::Other => {}
        }
    }

    /// A chunk carrying a piece of tool call `k`'s arguments.
    fn arguments(&self, k: usize, arguments: &str, out: &mut BytesMut) {
        self.chunk(
            DeltaOut {
                tool_calls: Some([ToolDelta {
                    index: k,
                    id: None,
                    kind: None,
                    function: FunctionDelta {
                        name: None,
                        arguments,
                    },
                }]),
                ..DeltaOut::default()
            },
            None,
            out,
        );
    }

    fn fail(&mut self, kind: &str, message: &str, out: &mut BytesMut) {
        // One terminating error event, whatever follows.
        if self.failed.is_some() {
            return;
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&error_json(kind, message));
        out.extend_from_slice(b"\n\n");
        self.failed = Some((kind.to_owned(), message.to_owned()));
    }

    fn chunk(&self, delta: DeltaOut<'_>, finish: Option<&'static str>, out: &mut BytesMut) {
        let choices = [ChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason: finish,
        }];
        let c = ChunkOut {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: &choices,
            usage: None,
        };
        write_event(&c, out);
    }
}

fn write_event(c: &ChunkOut<'_>, out: &mut BytesMut) {
    // Serialising strings and numbers cannot fail; were it to, the event
    // is left out rather than sent half written.
    if let Ok(json) = serde_json::to_vec(c) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&json);
        out.extend_from_slice(b"\n\n");
    }
}

#[cfg(test)]
mod tests;
