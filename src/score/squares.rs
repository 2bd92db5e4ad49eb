//! Squares and fourth powers as products: `Pow(x, 2)` becomes `Mul(x, x)` and
//! `Pow(x, 4)` becomes `Mul(Mul(x, x), Mul(x, x))`, in the encoder's ONNX graph as it is
//! loaded. ONNX Runtime's `Pow` (1.31, CPU) is far slower than its `Mul` for the same
//! values: in `streamiq-tiny`, whose pooling takes the fourth power of every activation
//! of each stage, `Pow` was about 38 % of the tower's time, and the rewrite makes a call
//! of 32 views about 1.4x cheaper (README, Performance). The embeddings move by at most a few
//! units in the last place (1e-6 on unit-norm vectors).
//!
//! The file on disk is not changed (its sha256 stays the model's identity for labels and
//! prompt sets). The rewrite reads the protobuf wire format directly (prost's encoding
//! functions, no ONNX library):
//! it touches only top-level `Pow` nodes of the default domain whose exponent is a scalar
//! float constant (a `Constant` node or an initializer) equal to 2 or 4, removes the
//! `Constant` nodes nothing uses any more, and copies every other byte as it was. A graph
//! it cannot follow (subgraphs, malformed bytes) is left alone.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use prost::encoding::{WireType, decode_key, decode_varint, encode_key, encode_varint};

/// The model's bytes with its squares and fourth powers computed as products, and how
/// many `Pow` nodes were rewritten; the bytes as given (and 0) where there is nothing to
/// rewrite or the graph cannot be followed.
pub fn rewrite(model: &[u8]) -> (Cow<'_, [u8]>, usize) {
    match try_rewrite(model) {
        Some((bytes, n)) if n > 0 => (Cow::Owned(bytes), n),
        _ => (Cow::Borrowed(model), 0),
    }
}

// ModelProto.graph; GraphProto.node, .initializer, .output; NodeProto.input, .output,
// .name, .op_type, .attribute, .domain; AttributeProto.name, .f, .t, .g, .graphs;
// TensorProto.dims, .data_type, .float_data, .name, .raw_data; ValueInfoProto.name.
const MODEL_GRAPH: u32 = 7;
const GRAPH_NODE: u32 = 1;
const GRAPH_INITIALIZER: u32 = 5;
const GRAPH_INPUT: u32 = 11;
const GRAPH_OUTPUT: u32 = 12;
const NODE_INPUT: u32 = 1;
const NODE_OUTPUT: u32 = 2;
const NODE_NAME: u32 = 3;
const NODE_OP_TYPE: u32 = 4;
const NODE_ATTRIBUTE: u32 = 5;
const NODE_DOMAIN: u32 = 7;
const ATTR_NAME: u32 = 1;
const ATTR_F: u32 = 2;
const ATTR_T: u32 = 5;
const ATTR_G: u32 = 6;
const ATTR_GRAPHS: u32 = 11;
const TENSOR_DIMS: u32 = 1;
const TENSOR_DATA_TYPE: u32 = 2;
const TENSOR_FLOAT_DATA: u32 = 4;
const TENSOR_NAME: u32 = 8;
const TENSOR_RAW_DATA: u32 = 9;
const VALUE_INFO_NAME: u32 = 1;
const FLOAT: u64 = 1;

/// One field of a message: its number, its value, and all its bytes (key included).
struct Field<'a> {
    number: u32,
    value: Value<'a>,
    raw: &'a [u8],
}

enum Value<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// The fields of a message, or `None` if the bytes are not one (groups included).
fn fields(buf: &[u8]) -> Option<Vec<Field<'_>>> {
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        let start = buf.len() - rest.len();
        let (number, wire) = decode_key(&mut rest).ok()?;
        let value = match wire {
            WireType::Varint => Value::Varint(decode_varint(&mut rest).ok()?),
            WireType::SixtyFourBit => {
                rest = rest.get(8..)?;
                Value::Fixed64
            }
            WireType::LengthDelimited => {
                let len = usize::try_from(decode_varint(&mut rest).ok()?).ok()?;
                let bytes = rest.get(..len)?;
                rest = &rest[len..];
                Value::Bytes(bytes)
            }
            WireType::ThirtyTwoBit => {
                let b = rest.get(..4)?;
                rest = &rest[4..];
                Value::Fixed32(u32::from_le_bytes(b.try_into().ok()?))
            }
            WireType::StartGroup | WireType::EndGroup => return None,
        };
        out.push(Field {
            number,
            value,
            raw: &buf[start..buf.len() - rest.len()],
        });
    }
    Some(out)
}

fn bytes_of<'a>(f: &Field<'a>) -> Option<&'a [u8]> {
    match f.value {
        Value::Bytes(b) => Some(b),
        _ => None,
    }
}

fn string_of<'a>(f: &Field<'a>) -> Option<&'a str> {
    std::str::from_utf8(bytes_of(f)?).ok()
}

fn put_bytes(out: &mut Vec<u8>, number: u32, bytes: &[u8]) {
    encode_key(number, WireType::LengthDelimited, out);
    encode_varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// The parts of a node the rewrite reads.
struct Node<'a> {
    inputs: Vec<&'a str>,
    outputs: Vec<&'a str>,
    name: &'a str,
    op_type: &'a str,
    domain: &'a str,
    /// A `Constant` node's value, if a scalar float.
    scalar: Option<f32>,
    has_subgraph: bool,
}

fn node(buf: &[u8]) -> Option<Node<'_>> {
    let mut n = Node {
        inputs: Vec::new(),
        outputs: Vec::new(),
        name: "",
        op_type: "",
        domain: "",
        scalar: None,
        has_subgraph: false,
    };
    let mut attributes = Vec::new();
    for f in fields(buf)? {
        match f.number {
            NODE_INPUT => n.inputs.push(string_of(&f)?),
            NODE_OUTPUT => n.outputs.push(string_of(&f)?),
            NODE_NAME => n.name = string_of(&f)?,
            NODE_OP_TYPE => n.op_type = string_of(&f)?,
            NODE_DOMAIN => n.domain = string_of(&f)?,
            NODE_ATTRIBUTE => attributes.push(bytes_of(&f)?),
            _ => {}
        }
    }
    for a in attributes {
        let fs = fields(a)?;
        if fs
            .iter()
            .any(|f| f.number == ATTR_G || f.number == ATTR_GRAPHS)
        {
            n.has_subgraph = true;
        }
        if n.op_type != "Constant" {
            continue;
        }
        let name = fs
            .iter()
            .find(|f| f.number == ATTR_NAME)
            .and_then(string_of);
        for f in &fs {
            match (name, f.number, &f.value) {
                (Some("value"), ATTR_T, Value::Bytes(t)) => {
                    n.scalar = scalar_tensor(t).map(|s| s.1)
                }
                (Some("value_float"), ATTR_F, Value::Fixed32(bits)) => {
                    n.scalar = Some(f32::from_bits(*bits))
                }
                _ => {}
            }
        }
    }
    Some(n)
}

/// A TensorProto holding one float: its name and value.
fn scalar_tensor(buf: &[u8]) -> Option<(&str, f32)> {
    let (mut name, mut data_type, mut elements) = ("", 0, 1u64);
    let mut value = None;
    for f in fields(buf)? {
        match (f.number, &f.value) {
            (TENSOR_DIMS, Value::Varint(d)) => elements = elements.checked_mul(*d)?,
            (TENSOR_DIMS, Value::Bytes(packed)) => {
                let mut rest: &[u8] = packed;
                while !rest.is_empty() {
                    elements = elements.checked_mul(decode_varint(&mut rest).ok()?)?;
                }
            }
            (TENSOR_DATA_TYPE, Value::Varint(t)) => data_type = *t,
            (TENSOR_FLOAT_DATA, Value::Fixed32(bits)) => value = Some(f32::from_bits(*bits)),
            (TENSOR_FLOAT_DATA, Value::Bytes(b)) | (TENSOR_RAW_DATA, Value::Bytes(b))
                if b.len() == 4 =>
            {
                value = Some(f32::from_le_bytes((*b).try_into().ok()?))
            }
            (TENSOR_NAME, Value::Bytes(_)) => name = string_of(&f)?,
            _ => {}
        }
    }
    (data_type == FLOAT && elements == 1).then_some((name, value?))
}

fn encode_node(out: &mut Vec<u8>, inputs: &[&str], output: &str, name: &str) {
    let mut n = Vec::new();
    for i in inputs {
        put_bytes(&mut n, NODE_INPUT, i.as_bytes());
    }
    put_bytes(&mut n, NODE_OUTPUT, output.as_bytes());
    put_bytes(&mut n, NODE_NAME, name.as_bytes());
    put_bytes(&mut n, NODE_OP_TYPE, b"Mul");
    put_bytes(out, GRAPH_NODE, &n);
}

fn try_rewrite(model: &[u8]) -> Option<(Vec<u8>, usize)> {
    let top = fields(model)?;
    let mut graphs = top.iter().filter(|f| f.number == MODEL_GRAPH);
    let graph = bytes_of(graphs.next()?)?;
    if graphs.next().is_some() {
        return None;
    }
    let gfields = fields(graph)?;
    let mut nodes = Vec::new();
    let mut scalars: HashMap<&str, f32> = HashMap::new();
    let mut names: HashSet<&str> = HashSet::new();
    let mut graph_outputs: HashSet<&str> = HashSet::new();
    // An initializer that is also a graph input is only a default: a caller may feed
    // another exponent.
    let mut graph_inputs: HashSet<&str> = HashSet::new();
    for f in &gfields {
        match f.number {
            GRAPH_NODE => {
                let n = node(bytes_of(f)?)?;
                if n.has_subgraph {
                    // Names may be used from inside it: not followed.
                    return None;
                }
                if let (Some(v), [out]) = (n.scalar, n.outputs.as_slice()) {
                    scalars.insert(out, v);
                }
                names.extend(n.inputs.iter().chain(&n.outputs).copied());
                nodes.push(n);
            }
            GRAPH_INITIALIZER => {
                if let Some((name, v)) = scalar_tensor(bytes_of(f)?) {
                    scalars.insert(name, v);
                }
            }
            GRAPH_OUTPUT | GRAPH_INPUT => {
                let vi = fields(bytes_of(f)?)?;
                if let Some(name) = vi
                    .iter()
                    .find(|f| f.number == VALUE_INFO_NAME)
                    .and_then(string_of)
                {
                    if f.number == GRAPH_OUTPUT {
                        graph_outputs.insert(name);
                    } else {
                        graph_inputs.insert(name);
                    }
                }
            }
            _ => {}
        }
    }
    // Which Pow nodes become products, and the exponent of each.
    let exponent = |n: &Node| -> Option<u32> {
        let plain = n.domain.is_empty() || n.domain == "ai.onnx";
        match (plain, n.op_type, n.inputs.as_slice(), n.outputs.as_slice()) {
            (true, "Pow", [_, e], [_]) if !graph_inputs.contains(e) => {
                match scalars.get(e).copied() {
                    Some(2.0) => Some(2),
                    Some(4.0) => Some(4),
                    _ => None,
                }
            }
            _ => None,
        }
    };
    let plan: Vec<Option<u32>> = nodes.iter().map(exponent).collect();
    let rewritten = plan.iter().flatten().count();
    if rewritten == 0 {
        return Some((Vec::new(), 0));
    }
    // Inputs still read once the rewritten nodes no longer read their exponent.
    let mut used: HashSet<&str> = graph_outputs.clone();
    for (n, p) in nodes.iter().zip(&plan) {
        let read = if p.is_some() {
            &n.inputs[..1]
        } else {
            &n.inputs[..]
        };
        used.extend(read.iter().copied());
    }
    let unused_constant =
        |n: &Node| n.op_type == "Constant" && n.outputs.iter().all(|o| !used.contains(o));

    let mut graph_out = Vec::with_capacity(graph.len());
    let mut i = 0;
    for f in &gfields {
        if f.number != GRAPH_NODE {
            graph_out.extend_from_slice(f.raw);
            continue;
        }
        let (n, p) = (&nodes[i], plan[i]);
        i += 1;
        match p {
            Some(2) => encode_node(
                &mut graph_out,
                &[n.inputs[0], n.inputs[0]],
                n.outputs[0],
                n.name,
            ),
            Some(_) => {
                let mut square = format!("{}__streamiq_square", n.outputs[0]);
                while names.contains(square.as_str()) {
                    square.push('_');
                }
                let x = n.inputs[0];
                encode_node(
                    &mut graph_out,
                    &[x, x],
                    &square,
                    &format!("{}__square", n.name),
                );
                encode_node(&mut graph_out, &[&square, &square], n.outputs[0], n.name);
            }
            None if unused_constant(n) => {}
            None => graph_out.extend_from_slice(f.raw),
        }
    }
    let mut out = Vec::with_capacity(model.len());
    for f in &top {
        if f.number == MODEL_GRAPH {
            put_bytes(&mut out, MODEL_GRAPH, &graph_out);
        } else {
            out.extend_from_slice(f.raw);
        }
    }
    Some((out, rewritten))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, value: f32, raw: bool) -> Vec<u8> {
        let mut t = Vec::new();
        encode_key(TENSOR_DATA_TYPE, WireType::Varint, &mut t);
        encode_varint(FLOAT, &mut t);
        put_bytes(&mut t, TENSOR_NAME, name.as_bytes());
        if raw {
            put_bytes(&mut t, TENSOR_RAW_DATA, &value.to_le_bytes());
        } else {
            put_bytes(&mut t, TENSOR_FLOAT_DATA, &value.to_le_bytes());
        }
        t
    }

    fn node_bytes(op: &str, inputs: &[&str], output: &str, attr: Option<Vec<u8>>) -> Vec<u8> {
        let mut n = Vec::new();
        for i in inputs {
            put_bytes(&mut n, NODE_INPUT, i.as_bytes());
        }
        put_bytes(&mut n, NODE_OUTPUT, output.as_bytes());
        put_bytes(&mut n, NODE_OP_TYPE, op.as_bytes());
        if let Some(a) = attr {
            put_bytes(&mut n, NODE_ATTRIBUTE, &a);
        }
        n
    }

    fn constant(output: &str, value: f32) -> Vec<u8> {
        let mut a = Vec::new();
        put_bytes(&mut a, ATTR_NAME, b"value");
        put_bytes(&mut a, ATTR_T, &tensor("", value, true));
        node_bytes("Constant", &[], output, Some(a))
    }

    fn model(nodes: &[Vec<u8>], initializers: &[Vec<u8>]) -> Vec<u8> {
        let mut g = Vec::new();
        for n in nodes {
            put_bytes(&mut g, GRAPH_NODE, n);
        }
        for t in initializers {
            put_bytes(&mut g, GRAPH_INITIALIZER, t);
        }
        let mut out_vi = Vec::new();
        put_bytes(&mut out_vi, VALUE_INFO_NAME, b"y");
        put_bytes(&mut g, GRAPH_OUTPUT, &out_vi);
        let mut m = Vec::new();
        encode_key(1, WireType::Varint, &mut m); // ir_version
        encode_varint(8, &mut m);
        put_bytes(&mut m, MODEL_GRAPH, &g);
        m
    }

    fn ops(model: &[u8]) -> Vec<(String, Vec<String>, String)> {
        let top = fields(model).unwrap();
        let g = bytes_of(top.iter().find(|f| f.number == MODEL_GRAPH).unwrap()).unwrap();
        fields(g)
            .unwrap()
            .iter()
            .filter(|f| f.number == GRAPH_NODE)
            .map(|f| {
                let n = node(bytes_of(f).unwrap()).unwrap();
                let inputs = n.inputs.iter().map(|s| s.to_string()).collect();
                (n.op_type.to_string(), inputs, n.outputs[0].to_string())
            })
            .collect()
    }

    #[test]
    fn squares_and_fourth_powers_become_products_and_their_constants_go() {
        let m = model(
            &[
                constant("two", 2.0),
                constant("three", 3.0),
                node_bytes("Pow", &["x", "two"], "a", None),
                node_bytes("Pow", &["a", "four"], "b", None),
                node_bytes("Pow", &["b", "three"], "c", None),
                node_bytes("Add", &["c", "x"], "y", None),
            ],
            &[tensor("four", 4.0, false)],
        );
        let (out, n) = rewrite(&m);
        assert_eq!(n, 2);
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            ops(&out),
            vec![
                ("Constant".into(), s(&[]), "three".into()),
                ("Mul".into(), s(&["x", "x"]), "a".into()),
                ("Mul".into(), s(&["a", "a"]), "b__streamiq_square".into()),
                (
                    "Mul".into(),
                    s(&["b__streamiq_square", "b__streamiq_square"]),
                    "b".into()
                ),
                ("Pow".into(), s(&["b", "three"]), "c".into()),
                ("Add".into(), s(&["c", "x"]), "y".into()),
            ]
        );
        // The initializer and everything else are kept byte for byte.
        assert!(out.windows(4).any(|w| w == 4.0f32.to_le_bytes().as_slice()));
    }

    #[test]
    fn graphs_it_cannot_follow_are_left_alone() {
        // Nothing to rewrite.
        let m = model(&[node_bytes("Relu", &["x"], "y", None)], &[]);
        assert!(matches!(rewrite(&m), (Cow::Borrowed(_), 0)));
        // A Pow whose exponent is computed, or a vector.
        let m = model(
            &[
                node_bytes("Shape", &["x"], "e", None),
                node_bytes("Pow", &["x", "e"], "y", None),
            ],
            &[],
        );
        assert_eq!(rewrite(&m).1, 0);
        // An exponent that is a graph input with a default (an initializer of its name).
        let mut m = model(
            &[node_bytes("Pow", &["x", "e"], "y", None)],
            &[tensor("e", 2.0, true)],
        );
        let mut vi = Vec::new();
        put_bytes(&mut vi, VALUE_INFO_NAME, b"e");
        let top = fields(&m).unwrap();
        let mut g = bytes_of(top.iter().find(|f| f.number == MODEL_GRAPH).unwrap())
            .unwrap()
            .to_vec();
        assert_eq!(rewrite(&m).1, 1);
        put_bytes(&mut g, GRAPH_INPUT, &vi);
        m.clear();
        put_bytes(&mut m, MODEL_GRAPH, &g);
        assert_eq!(rewrite(&m).1, 0);
        // A subgraph anywhere.
        let mut a = Vec::new();
        put_bytes(&mut a, ATTR_NAME, b"then_branch");
        put_bytes(&mut a, ATTR_G, b"");
        let m = model(
            &[
                constant("two", 2.0),
                node_bytes("If", &["c"], "z", Some(a)),
                node_bytes("Pow", &["x", "two"], "y", None),
            ],
            &[],
        );
        assert_eq!(rewrite(&m).1, 0);
        // Malformed or truncated bytes: no panic, nothing rewritten.
        let m = model(
            &[
                constant("two", 2.0),
                node_bytes("Pow", &["x", "two"], "y", None),
            ],
            &[],
        );
        assert_eq!(rewrite(&m).1, 1);
        for cut in 0..m.len() {
            let _ = rewrite(&m[..cut]);
        }
        assert_eq!(rewrite(&[0xff; 16]).1, 0);
        assert_eq!(rewrite(b"").1, 0);
    }
}
