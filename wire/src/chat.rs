//! An OpenAI chat completion request, read once: just enough to route it
//! (`model`, `stream`, `stream_options.include_usage`), and checked enough
//! that the sidecar never forwards a request a provider must refuse
//! (`messages` a non-empty list of objects with a `role`, token limits
//! non-negative integers). The whole body is parsed, so malformed JSON is
//! refused here, but nothing outside those fields is kept or allocated:
//! prompts pass through as bytes. Legacy completions (`prompt`) and
//! embeddings (`input`) are read by the same parser (`parse_for`).
//!
//! Also the two rewrites the sidecar makes: asking for the usage chunk of a
//! stream, and degrading a request (another model, capped `max_tokens`).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::operation::Operation;

/// What the sidecar reads of a chat completion request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest<'a> {
    pub model: Cow<'a, str>,
    pub stream: bool,
    /// `stream_options.include_usage` as the app sent it: `None` when
    /// there are no stream options at all.
    pub include_usage: Option<bool>,
    /// `max_tokens`, else `max_completion_tokens`, when either is set.
    pub max_tokens: Option<u64>,
    pub messages: usize,
}

/// Why a request is refused, naming the parameter as OpenAI does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    /// `None` when the body as a whole is at fault (not JSON).
    pub param: Option<Cow<'static, str>>,
    /// OpenAI's error code: `missing_required_parameter`, `invalid_type`,
    /// `invalid_value`, `empty_array`, ...
    pub code: Option<&'static str>,
    pub message: String,
}

impl Invalid {
    fn new(param: impl Into<Cow<'static, str>>, code: &'static str, message: String) -> Self {
        Self {
            param: Some(param.into()),
            code: Some(code),
            message,
        }
    }

    fn missing(param: impl Into<Cow<'static, str>>) -> Self {
        let param = param.into();
        let message = format!("Missing required parameter: '{param}'.");
        Self::new(param, "missing_required_parameter", message)
    }

    fn wrong_type(param: impl Into<Cow<'static, str>>, expected: &str, got: &Seen<'_>) -> Self {
        let param = param.into();
        let message = format!(
            "Invalid type for '{param}': expected {expected}, but got {} instead.",
            got.name()
        );
        Self::new(param, "invalid_type", message)
    }

    fn malformed(reason: impl fmt::Display) -> Self {
        Self {
            param: None,
            code: None,
            message: format!("The request body is not valid JSON: {reason}"),
        }
    }
}

/// A JSON value as far as checking needs: its type, and scalars; arrays and
/// objects are skipped without being kept.
#[derive(Debug, Clone, PartialEq)]
enum Seen<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Str(Cow<'a, str>),
    Array,
    Object,
}

impl Seen<'_> {
    /// The type as OpenAI's messages name it.
    fn name(&self) -> &'static str {
        match self {
            Seen::Null => "null",
            Seen::Bool(_) => "a boolean",
            Seen::Int(_) | Seen::Uint(_) => "an integer",
            Seen::Float(_) => "a decimal",
            Seen::Str(_) => "a string",
            Seen::Array => "an array",
            Seen::Object => "an object",
        }
    }
}

struct SeenVisitor;

impl<'de> Visitor<'de> for SeenVisitor {
    type Value = Seen<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Seen<'de>, E> {
        Ok(Seen::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Seen<'de>, E> {
        Ok(Seen::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Seen<'de>, E> {
        Ok(Seen::Uint(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Seen<'de>, E> {
        Ok(Seen::Float(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Seen<'de>, E> {
        Ok(Seen::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Seen<'de>, E> {
        Ok(Seen::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Seen<'de>, E> {
        Ok(Seen::Str(Cow::Owned(v)))
    }
    fn visit_unit<E>(self) -> Result<Seen<'de>, E> {
        Ok(Seen::Null)
    }
    fn visit_none<E>(self) -> Result<Seen<'de>, E> {
        Ok(Seen::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Seen<'de>, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Seen<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Seen::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Seen<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Seen::Object)
    }
}

impl<'de> de::Deserialize<'de> for Seen<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SeenVisitor)
    }
}

/// The scalar `visit_*` methods of a visitor whose value wraps any other
/// JSON value as `$wrap(Seen)`: the type is kept (for the error message),
/// the value is not.
macro_rules! scalars_as {
    ($value:ty, $wrap:path) => {
        fn visit_bool<E>(self, v: bool) -> Result<$value, E> {
            Ok($wrap(Seen::Bool(v)))
        }
        fn visit_i64<E>(self, v: i64) -> Result<$value, E> {
            Ok($wrap(Seen::Int(v)))
        }
        fn visit_u64<E>(self, v: u64) -> Result<$value, E> {
            Ok($wrap(Seen::Uint(v)))
        }
        fn visit_f64<E>(self, v: f64) -> Result<$value, E> {
            Ok($wrap(Seen::Float(v)))
        }
        fn visit_str<E>(self, _: &str) -> Result<$value, E> {
            Ok($wrap(Seen::Str(Cow::Borrowed(""))))
        }
        fn visit_unit<E>(self) -> Result<$value, E> {
            Ok($wrap(Seen::Null))
        }
    };
}

/// The top-level keys the sidecar reads; the rest are skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Model,
    Messages,
    Stream,
    StreamOptions,
    MaxTokens,
    MaxCompletionTokens,
    IncludeUsage,
    Role,
    Prompt,
    Input,
    Other,
}

impl Key {
    fn of(s: &str) -> Key {
        match s {
            "model" => Key::Model,
            "messages" => Key::Messages,
            "stream" => Key::Stream,
            "stream_options" => Key::StreamOptions,
            "max_tokens" => Key::MaxTokens,
            "max_completion_tokens" => Key::MaxCompletionTokens,
            "include_usage" => Key::IncludeUsage,
            "role" => Key::Role,
            "prompt" => Key::Prompt,
            "input" => Key::Input,
            _ => Key::Other,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Key::Model => "model",
            Key::Messages => "messages",
            Key::Stream => "stream",
            Key::StreamOptions => "stream_options",
            Key::MaxTokens => "max_tokens",
            Key::MaxCompletionTokens => "max_completion_tokens",
            Key::IncludeUsage => "include_usage",
            Key::Role => "role",
            Key::Prompt => "prompt",
            Key::Input => "input",
            Key::Other => "",
        }
    }
}

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E>(self, v: &str) -> Result<Key, E> {
                Ok(Key::of(v))
            }
        }
        d.deserialize_str(V)
    }
}

/// One element of `messages`, as far as it is checked.
#[derive(Debug, Clone, PartialEq)]
enum Message<'a> {
    NotObject(Seen<'a>),
    Role(Option<Seen<'a>>),
}

impl<'de> de::Deserialize<'de> for Message<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Message<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message<'de>, A::Error> {
                let mut role = None;
                while let Some(k) = map.next_key::<Key>()? {
                    if k == Key::Role {
                        role = Some(map.next_value::<Seen<'de>>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Message::Role(role))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Message<'de>, A::Error> {
                SeenVisitor.visit_seq(seq).map(Message::NotObject)
            }
            scalars_as!(Message<'de>, Message::NotObject);
        }
        d.deserialize_any(V)
    }
}

/// `messages` as far as it is checked: how many, and the first fault.
#[derive(Debug, Clone, PartialEq)]
enum Messages<'a> {
    List {
        len: usize,
        fault: Option<(usize, Message<'a>)>,
    },
    NotList(Seen<'a>),
}

impl<'de> de::Deserialize<'de> for Messages<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Messages<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of messages")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Messages<'de>, A::Error> {
                let mut len = 0;
                let mut fault = None;
                while let Some(m) = seq.next_element::<Message<'de>>()? {
                    if fault.is_none() && !message_ok(&m) {
                        fault = Some((len, m));
                    }
                    len += 1;
                }
                Ok(Messages::List { len, fault })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Messages<'de>, A::Error> {
                SeenVisitor.visit_map(map).map(Messages::NotList)
            }
            scalars_as!(Messages<'de>, Messages::NotList);
        }
        d.deserialize_any(V)
    }
}

fn message_ok(m: &Message<'_>) -> bool {
    matches!(m, Message::Role(Some(Seen::Str(r))) if !r.is_empty())
}

/// `stream_options`, as far as it is read.
#[derive(Debug, Clone, PartialEq)]
enum StreamOptions<'a> {
    Object { include_usage: Option<Seen<'a>> },
    Other(Seen<'a>),
}

impl<'de> de::Deserialize<'de> for StreamOptions<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StreamOptions<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("stream options")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<StreamOptions<'de>, A::Error> {
                let mut include_usage = None;
                while let Some(k) = map.next_key::<Key>()? {
                    if k == Key::IncludeUsage {
                        include_usage = Some(map.next_value::<Seen<'de>>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(StreamOptions::Object { include_usage })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<StreamOptions<'de>, A::Error> {
                SeenVisitor.visit_seq(seq).map(StreamOptions::Other)
            }
            scalars_as!(StreamOptions<'de>, StreamOptions::Other);
        }
        d.deserialize_any(V)
    }
}

/// The top level: the fields read, and the first key seen twice.
#[derive(Debug, Default)]
struct Fields<'a> {
    model: Option<Seen<'a>>,
    messages: Option<Messages<'a>>,
    stream: Option<Seen<'a>>,
    stream_options: Option<StreamOptions<'a>>,
    max_tokens: Option<Seen<'a>>,
    max_completion_tokens: Option<Seen<'a>>,
    prompt: Option<Seen<'a>>,
    input: Option<Seen<'a>>,
    twice: Option<Key>,
}

struct FieldsSeed;

impl<'de> DeserializeSeed<'de> for FieldsSeed {
    type Value = Option<Fields<'de>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FieldsSeed {
    /// `None`: the body is JSON but not an object.
    type Value = Option<Fields<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        fn set<T>(slot: &mut Option<T>, v: T, k: Key, twice: &mut Option<Key>) {
            if slot.replace(v).is_some() && twice.is_none() {
                *twice = Some(k);
            }
        }
        let mut f = Fields::default();
        while let Some(k) = map.next_key::<Key>()? {
            let twice = &mut f.twice;
            match k {
                Key::Model => set(&mut f.model, map.next_value()?, k, twice),
                Key::Messages => set(&mut f.messages, map.next_value()?, k, twice),
                Key::Stream => set(&mut f.stream, map.next_value()?, k, twice),
                Key::StreamOptions => set(&mut f.stream_options, map.next_value()?, k, twice),
                Key::MaxTokens => set(&mut f.max_tokens, map.next_value()?, k, twice),
                Key::MaxCompletionTokens => {
                    set(&mut f.max_completion_tokens, map.next_value()?, k, twice)
                }
                Key::Prompt => set(&mut f.prompt, map.next_value()?, k, twice),
                Key::Input => set(&mut f.input, map.next_value()?, k, twice),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Some(f))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        SeenVisitor.visit_seq(seq).map(|_| None)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// Reads and checks a chat completion request body.
pub fn parse(body: &[u8]) -> Result<ChatRequest<'_>, Invalid> {
    parse_for(Operation::Chat, body)
}

/// Reads and checks the request body of `op`: what is read is the same for
/// every operation (`messages` stays 0 for those without); what must be
/// there differs (`messages` for chat, `prompt` for completions, `input`
/// for embeddings, which never stream).
pub fn parse_for(op: Operation, body: &[u8]) -> Result<ChatRequest<'_>, Invalid> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let fields = FieldsSeed
        .deserialize(&mut de)
        .and_then(|f| de.end().map(|()| f))
        .map_err(Invalid::malformed)?
        .ok_or_else(|| Invalid::malformed("the body must be a JSON object"))?;
    check(op, fields)
}

/// A required `prompt` or `input`: a string or an array (of strings or of
/// token ids; what is inside is the provider's to check).
fn text_or_list(key: Key, v: Option<Seen<'_>>) -> Result<(), Invalid> {
    let name = key.name();
    match v {
        None | Some(Seen::Null) => Err(Invalid::missing(name)),
        Some(Seen::Str(_) | Seen::Array) => Ok(()),
        Some(other) => Err(Invalid::wrong_type(name, "a string or an array", &other)),
    }
}

/// An optional non-negative integer parameter.
fn count(param: Key, v: Option<Seen<'_>>) -> Result<Option<u64>, Invalid> {
    let name = param.name();
    match v {
        None | Some(Seen::Null) => Ok(None),
        Some(Seen::Uint(n)) => Ok(Some(n)),
        Some(Seen::Int(n)) => Err(Invalid::new(
            name,
            "integer_below_min_value",
            format!("Invalid '{name}': integer below minimum value. Expected a value >= 0, but got {n} instead."),
        )),
        Some(other) => Err(Invalid::wrong_type(name, "an integer", &other)),
    }
}

fn check(op: Operation, f: Fields<'_>) -> Result<ChatRequest<'_>, Invalid> {
    if let Some(k) = f.twice {
        let name = k.name();
        return Err(Invalid::new(
            name,
            "duplicate_parameter",
            format!("The parameter '{name}' is given more than once."),
        ));
    }
    let model = match f.model {
        None | Some(Seen::Null) => return Err(Invalid::missing("model")),
        Some(Seen::Str(m)) if m.is_empty() => {
            return Err(Invalid::new(
                "model",
                "invalid_value",
                "Invalid 'model': empty string.".to_string(),
            ))
        }
        Some(Seen::Str(m)) => m,
        Some(other) => return Err(Invalid::wrong_type("model", "a string", &other)),
    };
    let messages = match f.messages {
        _ if op != Operation::Chat => 0,
        None | Some(Messages::NotList(Seen::Null)) => return Err(Invalid::missing("messages")),
        Some(Messages::NotList(other)) => {
            return Err(Invalid::wrong_type("messages", "an array", &other))
        }
        Some(Messages::List { len: 0, .. }) => {
            return Err(Invalid::new(
                "messages",
                "empty_array",
                "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.".to_string(),
            ))
        }
        Some(Messages::List {
            fault: Some((i, m)),
            ..
        }) => return Err(message_fault(i, m)),
        Some(Messages::List { len, fault: None }) => len,
    };
    match op {
        Operation::Chat => {}
        Operation::Completions => text_or_list(Key::Prompt, f.prompt)?,
        Operation::Embeddings => text_or_list(Key::Input, f.input)?,
    }
    let stream = match f.stream {
        // Embeddings have no `stream`: whatever the app sent is the
        // provider's to refuse, and the answer is read as one JSON body.
        _ if !op.streams() => false,
        None | Some(Seen::Null) => false,
        Some(Seen::Bool(b)) => b,
        Some(other) => return Err(Invalid::wrong_type("stream", "a boolean", &other)),
    };
    let include_usage = match f.stream_options {
        None => None,
        // Present but null: the key is there, so asking for usage must
        // replace it rather than add a second one.
        Some(StreamOptions::Other(Seen::Null)) => Some(false),
        Some(StreamOptions::Other(other)) => {
            return Err(Invalid::wrong_type("stream_options", "an object", &other))
        }
        Some(StreamOptions::Object { include_usage }) => match include_usage {
            None | Some(Seen::Null) => Some(false),
            Some(Seen::Bool(b)) => Some(b),
            Some(other) => {
                return Err(Invalid::wrong_type(
                    "stream_options.include_usage",
                    "a boolean",
                    &other,
                ))
            }
        },
    };
    let max_tokens = count(Key::MaxTokens, f.max_tokens)?;
    let max_completion_tokens = count(Key::MaxCompletionTokens, f.max_completion_tokens)?;
    Ok(ChatRequest {
        model,
        stream,
        include_usage,
        max_tokens: max_tokens.or(max_completion_tokens),
        messages,
    })
}

fn message_fault(i: usize, m: Message<'_>) -> Invalid {
    match m {
        Message::NotObject(seen) => {
            Invalid::wrong_type(format!("messages[{i}]"), "an object", &seen)
        }
        Message::Role(None | Some(Seen::Null)) => Invalid::missing(format!("messages[{i}].role")),
        Message::Role(Some(Seen::Str(_))) => Invalid::new(
            format!("messages[{i}].role"),
            "invalid_value",
            format!("Invalid 'messages[{i}].role': empty string."),
        ),
        Message::Role(Some(other)) => {
            Invalid::wrong_type(format!("messages[{i}].role"), "a string", &other)
        }
    }
}

/// Sets `stream_options.include_usage` in a request. Without stream options
/// (`has_options` false) the field is spliced in after the opening brace,
/// with no parse; with them (rare) the body is rewritten.
pub fn ask_usage(body: &[u8], has_options: bool) -> Result<bytes::Bytes, Invalid> {
    if has_options {
        let mut v: serde_json::Value = serde_json::from_slice(body).map_err(Invalid::malformed)?;
        if let Some(o) = v.as_object_mut() {
            let opts = o
                .entry("stream_options")
                .or_insert_with(|| serde_json::Value::Object(Default::default()));
            if !opts.is_object() {
                *opts = serde_json::Value::Object(Default::default());
            }
            if let Some(opts) = opts.as_object_mut() {
                opts.insert("include_usage".into(), true.into());
            }
        }
        return serde_json::to_vec(&v)
            .map(bytes::Bytes::from)
            .map_err(Invalid::malformed);
    }
    let open = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .filter(|i| body.get(*i) == Some(&b'{'))
        .ok_or_else(|| Invalid::malformed("the body must be a JSON object"))?;
    let (head, rest) = body.split_at(open + 1);
    let empty = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
    let field: &[u8] = if empty {
        br#""stream_options":{"include_usage":true}"#
    } else {
        br#""stream_options":{"include_usage":true},"#
    };
    let mut out = Vec::with_capacity(body.len() + field.len());
    out.extend_from_slice(head);
    out.extend_from_slice(field);
    out.extend_from_slice(rest);
    Ok(bytes::Bytes::from(out))
}

/// Rewrites a request for a degradation: another model, or `max_tokens`
/// capped. Only degraded requests pay for this full parse.
pub fn rewrite(
    body: &[u8],
    model: Option<&str>,
    cap: Option<u32>,
) -> Result<bytes::Bytes, Invalid> {
    let mut v: serde_json::Value = serde_json::from_slice(body).map_err(Invalid::malformed)?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| Invalid::malformed("the body must be a JSON object"))?;
    if let Some(m) = model {
        obj.insert("model".into(), m.into());
    }
    if let Some(cap) = cap {
        for key in ["max_tokens", "max_completion_tokens"] {
            let current = obj.get(key).and_then(serde_json::Value::as_u64);
            if key == "max_tokens" || current.is_some() {
                obj.insert(
                    key.into(),
                    current.map_or(cap.into(), |c| c.min(cap.into())).into(),
                );
            }
        }
    }
    serde_json::to_vec(&v)
        .map(bytes::Bytes::from)
        .map_err(Invalid::malformed)
}

/// The `model` of a request body of any operation, when it is a string.
fn model_of(body: &[u8]) -> Option<Cow<'_, str>> {
    let mut de = serde_json::Deserializer::from_slice(body);
    match FieldsSeed.deserialize(&mut de).ok()??.model? {
        Seen::Str(m) => Some(m),
        _ => None,
    }
}

/// The body with its `model` replaced by the endpoint's own id for it,
/// when `id_for` has one: the value is spliced in place when the body
/// spells the model without escapes (the usual case: one copy of the body,
/// no re-serialisation), else the body is rewritten whole. `None`: the
/// endpoint has no id of its own for this model (or the body has no
/// readable model; intake refused those already).
pub fn map_model<'i>(
    body: &[u8],
    id_for: impl FnOnce(&str) -> Option<&'i str>,
) -> Option<bytes::Bytes> {
    let model = model_of(body)?;
    let id = id_for(&model)?;
    if let Cow::Borrowed(m) = model {
        // A borrowed model is a slice of `body`: its offset is where the
        // value's text starts, between its quotes.
        let start = (m.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
        let end = start.checked_add(m.len())?;
        let (head, rest) = (body.get(..start)?, body.get(end..)?);
        let quoted = serde_json::to_string(id).ok()?;
        let inner = quoted.get(1..quoted.len().saturating_sub(1))?;
        let mut out = Vec::with_capacity(body.len() + inner.len());
        out.extend_from_slice(head);
        out.extend_from_slice(inner.as_bytes());
        out.extend_from_slice(rest);
        return Some(bytes::Bytes::from(out));
    }
    rewrite(body, Some(id), None).ok()
}

#[cfg(test)]
mod tests;
