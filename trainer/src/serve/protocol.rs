//! The wire formats `ringmaster serve` speaks, as pure functions from request bodies to
//! inputs and from predictions to response bodies: the Open Inference Protocol v2
//! (`/v2/models/{name}/infer`), KServe v1 (`/v1/models/{name}:predict`) and the plain
//! `POST /predict {"text": ...}`. Every malformed body becomes a `BadRequest` that says
//! what and where, for a 400 in the protocol's error shape.

use base64::Engine;
use serde_json::{Map, Value, json};

/// A request the protocol layer refuses, with the message the client gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest(pub String);

impl BadRequest {
    fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

type Decoded<T> = std::result::Result<T, BadRequest>;

/// What a request asks to classify, before the model's own preprocessing.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Texts(Vec<String>),
    Images(Vec<Image>),
}

impl Payload {
    pub fn len(&self) -> usize {
        match self {
            Payload::Texts(texts) => texts.len(),
            Payload::Images(images) => images.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One image in any of the accepted forms.
#[derive(Debug, Clone, PartialEq)]
pub enum Image {
    /// A PNG or JPEG file.
    Encoded(Vec<u8>),
    /// Row-major interleaved pixels, `channels` 1 (grey) or 3 (RGB).
    Pixels {
        height: usize,
        width: usize,
        channels: usize,
        data: Vec<u8>,
    },
    /// The model's input itself: normalised CHW values.
    Tensor {
        channels: usize,
        height: usize,
        width: usize,
        data: Vec<f32>,
    },
}

/// One answer: the winning label, its probability and every class's probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub label: String,
    pub score: f32,
    pub probabilities: Vec<f32>,
}

impl Prediction {
    /// The arg-max of `probabilities` named by `labels`.
    pub fn new(probabilities: Vec<f32>, labels: &[String]) -> Self {
        let (best, score) = probabilities.iter().copied().enumerate().fold(
            (0, f32::NEG_INFINITY),
            |acc, (i, p)| {
                if p > acc.1 { (i, p) } else { acc }
            },
        );
        Self {
            label: labels[best].clone(),
            score,
            probabilities,
        }
    }
}

fn parse_object(body: &[u8]) -> Decoded<Map<String, Value>> {
    if body.is_empty() {
        return Err(BadRequest::new(
            "the request body is empty; send a JSON object",
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(BadRequest::new(format!(
            "the request body must be a JSON object, not {}",
            kind_of(&other)
        ))),
        Err(e) => Err(BadRequest::new(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn non_empty(payload: Payload, what: &str) -> Decoded<Payload> {
    if payload.is_empty() {
        Err(BadRequest::new(format!(
            "{what} is empty: send at least one input"
        )))
    } else {
        Ok(payload)
    }
}

// ---- Open Inference Protocol v2 ------------------------------------------------------

/// A v2 inference request: its optional `id` and its one input tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct V2Request {
    pub id: Option<String>,
    pub payload: Payload,
}

/// Decodes `{"id"?, "inputs": [{"name", "shape", "datatype", "data"}]}` with exactly one
/// input: BYTES of shape `[N]` (texts, or base64 PNG/JPEG images for an image model),
/// UINT8 `[N, H, W, C]` / `[N, H, W]` pixels, or FP32 `[N, C, H, W]` model input.
pub fn decode_v2(body: &[u8], text_model: bool) -> Decoded<V2Request> {
    let object = parse_object(body)?;
    let id = match object.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(id.clone()),
        Some(other) => {
            return Err(BadRequest::new(format!(
                "\"id\" must be a string, not {}",
                kind_of(other)
            )));
        }
    };
    let inputs = match object.get("inputs") {
        Some(Value::Array(inputs)) => inputs,
        Some(other) => {
            return Err(BadRequest::new(format!(
                "\"inputs\" must be an array of tensors, not {}",
                kind_of(other)
            )));
        }
        None => return Err(BadRequest::new("the request has no \"inputs\"")),
    };
    let [input] = inputs.as_slice() else {
        return Err(BadRequest::new(format!(
            "\"inputs\" holds {} tensors; this model takes exactly one",
            inputs.len()
        )));
    };
    let tensor = input
        .as_object()
        .ok_or_else(|| BadRequest::new("inputs[0] must be an object"))?;
    let name = tensor
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("input");
    let datatype = tensor
        .get("datatype")
        .and_then(Value::as_str)
        .ok_or_else(|| BadRequest::new(format!("input {name:?} has no \"datatype\"")))?;
    let shape = decode_shape(tensor.get("shape"), name)?;
    if let Some(&n) = shape.first() {
        too_many(n, &format!("input {name:?}"))?;
    }
    if shape.iter().skip(1).any(|&d| d == 0) {
        return Err(BadRequest::new(format!(
            "input {name:?}: shape {shape:?} has an empty dimension"
        )));
    }
    let data = tensor
        .get("data")
        .ok_or_else(|| BadRequest::new(format!("input {name:?} has no \"data\"")))?;
    let mut flat = Vec::new();
    flatten(data, &mut flat);
    let elements = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| BadRequest::new(format!("input {name:?}: shape {shape:?} is too large")))?;
    if flat.len() != elements {
        return Err(BadRequest::new(format!(
            "input {name:?}: shape {shape:?} holds {elements} values but \"data\" has {}",
            flat.len()
        )));
    }
    let payload = match (datatype, text_model) {
        ("BYTES", true) => {
            expect_rank(&shape, &[1], name, "[N] texts")?;
            Payload::Texts(strings(&flat, name)?)
        }
        ("BYTES", false) => {
            expect_rank(&shape, &[1], name, "[N] base64-encoded images")?;
            let images = strings(&flat, name)?
                .iter()
                .enumerate()
                .map(|(i, b64)| decode_base64(b64, &format!("{name}[{i}]")).map(Image::Encoded))
                .collect::<Decoded<_>>()?;
            Payload::Images(images)
        }
        ("UINT8", false) => {
            expect_rank(&shape, &[3, 4], name, "[N, H, W] or [N, H, W, C] pixels")?;
            let values = bytes(&flat, name)?;
            let (height, width) = (shape[1], shape[2]);
            let channels = shape.get(3).copied().unwrap_or(1);
            // No dimension is empty (checked above), so no image is.
            let images = values.chunks_exact(height * width * channels);
            Payload::Images(
                images
                    .map(|data| Image::Pixels {
                        height,
                        width,
                        channels,
                        data: data.to_vec(),
                    })
                    .collect(),
            )
        }
        ("FP32", false) => {
            expect_rank(&shape, &[4], name, "[N, C, H, W] model input")?;
            let values = floats(&flat, name)?;
            let (channels, height, width) = (shape[1], shape[2], shape[3]);
            let images = values.chunks_exact(channels * height * width);
            Payload::Images(
                images
                    .map(|data| Image::Tensor {
                        channels,
                        height,
                        width,
                        data: data.to_vec(),
                    })
                    .collect(),
            )
        }
        (other, true) => {
            return Err(BadRequest::new(format!(
                "input {name:?} has datatype {other}; a text model takes BYTES (strings)"
            )));
        }
        (other, false) => {
            return Err(BadRequest::new(format!(
                "input {name:?} has datatype {other}; an image model takes BYTES (base64 \
                 PNG/JPEG), UINT8 pixels or FP32 [N, C, H, W]"
            )));
        }
    };
    Ok(V2Request {
        id,
        payload: non_empty(payload, &format!("input {name:?}"))?,
    })
}

/// Inputs one request may carry: bounds the memory a small body can make the server
/// allocate (an 8 MiB body of tiny images would otherwise become gigabytes of tensors).
pub const MAX_INSTANCES: usize = 1024;

fn too_many(n: usize, what: &str) -> Decoded<()> {
    if n > MAX_INSTANCES {
        Err(BadRequest::new(format!(
            "{what} holds {n} inputs; one request takes at most {MAX_INSTANCES} (send several)"
        )))
    } else {
        Ok(())
    }
}

fn decode_shape(shape: Option<&Value>, name: &str) -> Decoded<Vec<usize>> {
    let dims = shape
        .and_then(Value::as_array)
        .ok_or_else(|| BadRequest::new(format!("input {name:?} has no \"shape\" array")))?;
    dims.iter()
        .map(|d| {
            d.as_u64()
                .filter(|&d| d <= 1 << 32)
                .map(|d| d as usize)
                .ok_or_else(|| {
                    BadRequest::new(format!(
                        "input {name:?}: shape {} must hold non-negative integers",
                        Value::Array(dims.clone())
                    ))
                })
        })
        .collect()
}

fn expect_rank(shape: &[usize], ranks: &[usize], name: &str, expected: &str) -> Decoded<()> {
    if ranks.contains(&shape.len()) {
        Ok(())
    } else {
        Err(BadRequest::new(format!(
            "input {name:?} has shape {shape:?}; expected {expected}"
        )))
    }
}

/// Row-major leaves of nested arrays (v2 allows flat or nested `data`).
fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| flatten(item, out)),
        leaf => out.push(leaf),
    }
}

fn strings(values: &[&Value], name: &str) -> Decoded<Vec<String>> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str().map(str::to_string).ok_or_else(|| {
                BadRequest::new(format!(
                    "{name}[{i}] is {}; BYTES data must be strings",
                    kind_of(v)
                ))
            })
        })
        .collect()
}

fn bytes(values: &[&Value], name: &str) -> Decoded<Vec<u8>> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_u64()
                .and_then(|b| u8::try_from(b).ok())
                .ok_or_else(|| {
                    BadRequest::new(format!("{name}[{i}] is {v}; UINT8 data must be 0..=255"))
                })
        })
        .collect()
}

fn floats(values: &[&Value], name: &str) -> Decoded<Vec<f32>> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_f64()
                .map(|f| f as f32)
                .filter(|f| f.is_finite())
                .ok_or_else(|| {
                    BadRequest::new(format!(
                        "{name}[{i}] is {v}; FP32 data must be finite numbers"
                    ))
                })
        })
        .collect()
}

fn decode_base64(text: &str, what: &str) -> Decoded<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| BadRequest::new(format!("{what} is not valid base64: {e}")))
}

/// `{"model_name", "model_version", "id"?, "outputs": [label BYTES [N], probabilities FP32 [N, C]]}`.
pub fn encode_v2(
    model: &str,
    version: &str,
    id: Option<&str>,
    predictions: &[Prediction],
) -> Value {
    let classes = predictions.first().map_or(0, |p| p.probabilities.len());
    let mut response = json!({
        "model_name": model,
        "model_version": version,
        "outputs": [
            {
                "name": "label",
                "datatype": "BYTES",
                "shape": [predictions.len()],
                "data": predictions.iter().map(|p| p.label.as_str()).collect::<Vec<_>>(),
            },
            {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": [predictions.len(), classes],
                "data": predictions.iter().flat_map(|p| p.probabilities.iter().copied()).collect::<Vec<_>>(),
            },
        ],
    });
    if let Some(id) = id {
        response["id"] = id.into();
    }
    response
}

// ---- KServe v1 and /predict ----------------------------------------------------------

/// Decodes `{"instances": [...]}`: texts as strings or `{"text": ...}`; images as
/// `{"b64": ...}` / `{"image_bytes": {"b64": ...}}` or nested `[H][W][C]` pixel arrays.
pub fn decode_v1(body: &[u8], text_model: bool) -> Decoded<Payload> {
    let object = parse_object(body)?;
    instances(&object, text_model)
}

fn instances(object: &Map<String, Value>, text_model: bool) -> Decoded<Payload> {
    let instances = match object.get("instances") {
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(BadRequest::new(format!(
                "\"instances\" must be an array, not {}",
                kind_of(other)
            )));
        }
        None => return Err(BadRequest::new("the request has no \"instances\"")),
    };
    too_many(instances.len(), "\"instances\"")?;
    let payload = if text_model {
        Payload::Texts(
            instances
                .iter()
                .enumerate()
                .map(|(i, v)| text_instance(v, i))
                .collect::<Decoded<_>>()?,
        )
    } else {
        Payload::Images(
            instances
                .iter()
                .enumerate()
                .map(|(i, v)| image_instance(v, i))
                .collect::<Decoded<_>>()?,
        )
    };
    non_empty(payload, "\"instances\"")
}

fn text_instance(value: &Value, index: usize) -> Decoded<String> {
    match value {
        Value::String(text) => Ok(text.clone()),
        Value::Object(fields) => match fields.get("text") {
            Some(Value::String(text)) => Ok(text.clone()),
            _ => Err(BadRequest::new(format!(
                "instances[{index}] needs a string \"text\" field"
            ))),
        },
        other => Err(BadRequest::new(format!(
            "instances[{index}] is {}; a text model takes strings or {{\"text\": ...}}",
            kind_of(other)
        ))),
    }
}

fn image_instance(value: &Value, index: usize) -> Decoded<Image> {
    let what = format!("instances[{index}]");
    let b64 = value
        .get("b64")
        .or_else(|| value.get("image_bytes").and_then(|b| b.get("b64")));
    if let Some(b64) = b64 {
        let text = b64
            .as_str()
            .ok_or_else(|| BadRequest::new(format!("{what}: \"b64\" must be a string")))?;
        return decode_base64(text, &what).map(Image::Encoded);
    }
    let rows = value.as_array().ok_or_else(|| {
        BadRequest::new(format!(
            "{what} is {}; an image model takes {{\"b64\": ...}} or [H][W][C] pixels",
            kind_of(value)
        ))
    })?;
    let height = rows.len();
    let width = rows.first().and_then(Value::as_array).map_or(0, Vec::len);
    let channels = rows
        .first()
        .and_then(Value::as_array)
        .and_then(|r| r.first())
        .map_or(1, |p| p.as_array().map_or(1, Vec::len));
    let mut flat = Vec::new();
    flatten(value, &mut flat);
    if height == 0 || width == 0 || flat.len() != height * width * channels {
        return Err(BadRequest::new(format!(
            "{what}: pixel arrays must be non-empty and rectangular [H][W] or [H][W][C]"
        )));
    }
    Ok(Image::Pixels {
        height,
        width,
        channels,
        data: bytes(&flat, &what)?,
    })
}

/// `{"predictions": [{"label", "score", "probabilities": {label: p}}]}`.
pub fn encode_v1(predictions: &[Prediction], labels: &[String]) -> Value {
    json!({ "predictions": predictions.iter().map(|p| prediction_object(p, labels)).collect::<Vec<_>>() })
}

fn prediction_object(prediction: &Prediction, labels: &[String]) -> Value {
    let probabilities: Map<String, Value> = labels
        .iter()
        .zip(&prediction.probabilities)
        .map(|(label, &p)| (label.clone(), json!(p)))
        .collect();
    json!({ "label": prediction.label, "score": prediction.score, "probabilities": probabilities })
}

/// `POST /predict`: `{"text": ...}` (one answer object, as the Python baseline server
/// answers) or `{"instances": [...]}` (as v1).
#[derive(Debug, Clone, PartialEq)]
pub enum PlainRequest {
    One(String),
    Many(Payload),
}

pub fn decode_plain(body: &[u8], text_model: bool) -> Decoded<PlainRequest> {
    let object = parse_object(body)?;
    match object.get("text") {
        Some(Value::String(text)) if text_model => Ok(PlainRequest::One(text.clone())),
        Some(Value::String(_)) => Err(BadRequest::new(
            "this model classifies images; send {\"instances\": [{\"b64\": ...}]}",
        )),
        Some(other) => Err(BadRequest::new(format!(
            "\"text\" must be a string, not {}",
            kind_of(other)
        ))),
        None if object.contains_key("instances") => {
            instances(&object, text_model).map(PlainRequest::Many)
        }
        None => Err(BadRequest::new(
            "the request needs \"text\" (one input) or \"instances\" (several)",
        )),
    }
}

pub fn encode_plain(prediction: &Prediction, labels: &[String]) -> Value {
    prediction_object(prediction, labels)
}

/// The error body of every protocol here (v2's shape; KServe v1 uses the same).
pub fn error_body(message: &str) -> Value {
    json!({ "error": message })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(body: Value, text: bool) -> Decoded<V2Request> {
        decode_v2(body.to_string().as_bytes(), text)
    }

    #[test]
    fn v2_texts_flat_and_nested() {
        let request = v2(
            json!({"id": "r1", "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]}),
            true,
        )
        .unwrap();
        assert_eq!(request.id.as_deref(), Some("r1"));
        assert_eq!(
            request.payload,
            Payload::Texts(vec!["a".into(), "b".into()])
        );
        let nested = v2(
            json!({"inputs": [{"name": "x", "shape": [1, 2, 2, 1], "datatype": "UINT8", "data": [[[[1], [2]], [[3], [4]]]]}]}),
            false,
        )
        .unwrap();
        assert_eq!(
            nested.payload,
            Payload::Images(vec![Image::Pixels {
                height: 2,
                width: 2,
                channels: 1,
                data: vec![1, 2, 3, 4]
            }])
        );
    }

    #[test]
    fn v2_errors_say_what_is_wrong() {
        let cases = [
            (json!({}), true, "no \"inputs\""),
            (json!({"inputs": []}), true, "holds 0 tensors"),
            (
                json!({"inputs": [{"name": "t", "shape": [3], "datatype": "BYTES", "data": ["a"]}]}),
                true,
                "holds 3 values but \"data\" has 1",
            ),
            (
                json!({"inputs": [{"name": "t", "shape": [1], "datatype": "FP32", "data": [1.0]}]}),
                true,
                "a text model takes BYTES",
            ),
            (
                json!({"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": [7]}]}),
                true,
                "must be strings",
            ),
            (
                json!({"inputs": [{"name": "t", "shape": [0], "datatype": "BYTES", "data": []}]}),
                true,
                "is empty",
            ),
            (
                json!({"inputs": [{"name": "p", "shape": [1, 1, 1], "datatype": "UINT8", "data": [300]}]}),
                false,
                "0..=255",
            ),
            (
                json!({"inputs": [{"name": "p", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]}),
                false,
                "not valid base64",
            ),
            (
                json!({"inputs": [{"name": "p", "shape": [-1], "datatype": "BYTES", "data": []}]}),
                true,
                "non-negative integers",
            ),
            (
                json!({"inputs": [{"name": "p", "shape": [4294967296u64, 0, 1], "datatype": "UINT8", "data": []}]}),
                false,
                "at most 1024",
            ),
            (
                json!({"inputs": [{"name": "p", "shape": [2, 0, 1], "datatype": "UINT8", "data": []}]}),
                false,
                "empty dimension",
            ),
        ];
        for (body, text, expected) in cases {
            let error = v2(body.clone(), text).unwrap_err();
            assert!(error.0.contains(expected), "{body}: {error:?}");
        }
        assert!(
            decode_v2(b"{not json", true)
                .unwrap_err()
                .0
                .contains("not valid JSON")
        );
        assert!(
            decode_v2(b"[1]", true)
                .unwrap_err()
                .0
                .contains("not an array")
        );
    }

    #[test]
    fn v1_and_plain_forms() {
        let texts = decode_v1(br#"{"instances": ["a", {"text": "b"}]}"#, true).unwrap();
        assert_eq!(texts, Payload::Texts(vec!["a".into(), "b".into()]));
        let image = decode_v1(
            br#"{"instances": [{"image_bytes": {"b64": "AAEC"}}]}"#,
            false,
        )
        .unwrap();
        assert_eq!(image, Payload::Images(vec![Image::Encoded(vec![0, 1, 2])]));
        assert!(
            decode_v1(br#"{"instances": []}"#, true)
                .unwrap_err()
                .0
                .contains("empty")
        );
        assert!(
            decode_v1(br#"{"instances": [1]}"#, true)
                .unwrap_err()
                .0
                .contains("instances[0]")
        );
        assert_eq!(
            decode_plain(br#"{"text": "hi"}"#, true).unwrap(),
            PlainRequest::One("hi".into())
        );
        assert!(
            decode_plain(br#"{"txt": "hi"}"#, true)
                .unwrap_err()
                .0
                .contains("\"text\"")
        );
    }

    #[test]
    fn encodings_carry_labels_and_probabilities() {
        let labels = vec!["ham".to_string(), "spam".to_string()];
        let p = Prediction::new(vec![0.25, 0.75], &labels);
        assert_eq!((p.label.as_str(), p.score), ("spam", 0.75));
        let v2 = encode_v2("m", "abc", Some("r"), std::slice::from_ref(&p));
        assert_eq!(v2["outputs"][0]["data"], json!(["spam"]));
        assert_eq!(v2["outputs"][1]["shape"], json!([1, 2]));
        assert_eq!(v2["id"], "r");
        let v1 = encode_v1(&[p], &labels);
        assert_eq!(v1["predictions"][0]["probabilities"]["ham"], json!(0.25));
    }

    /// Random and mutated bodies never panic: every one decodes or is refused with a message.
    #[test]
    fn fuzzed_bodies_never_panic() {
        let seeds: [&[u8]; 5] = [
            br#"{"inputs": [{"name": "t", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]}"#,
            br#"{"inputs": [{"name": "p", "shape": [1, 2, 2, 3], "datatype": "UINT8", "data": [1,2,3,4,5,6,7,8,9,10,11,12]}]}"#,
            br#"{"inputs": [{"name": "p", "shape": [1, 1, 1, 1], "datatype": "FP32", "data": [[[[0.5]]]]}]}"#,
            br#"{"instances": ["a", {"text": "b"}, {"b64": "AAEC"}, [[[1,2,3]]]]}"#,
            br#"{"text": "hello"}"#,
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"{}[]\":,0123456789-.eE abcINPUTSnamedtypBYTESFP32UINT8\\";
        for round in 0..20_000 {
            let mut body = seeds[round % seeds.len()].to_vec();
            for _ in 0..1 + next() % 6 {
                let at = next() as usize % (body.len() + 1);
                match next() % 3 {
                    0 if at < body.len() => {
                        body.remove(at);
                    }
                    1 if at < body.len() => body[at] = alphabet[next() as usize % alphabet.len()],
                    _ => body.insert(at, alphabet[next() as usize % alphabet.len()]),
                }
            }
            for text in [true, false] {
                for BadRequest(message) in [
                    decode_v2(&body, text).err(),
                    decode_v1(&body, text).err(),
                    decode_plain(&body, text).err(),
                ]
                .into_iter()
                .flatten()
                {
                    assert!(!message.is_empty());
                }
            }
        }
    }
}
