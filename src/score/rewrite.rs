//! Cheaper equivalents in the encoder's ONNX graph, made as it is loaded. A tower that
//! pools statistics of every stage, as `streamiq-tiny` does (the mean, standard deviation
//! and fourth-power mean of each channel), spends much of its time in ONNX Runtime (1.31,
//! CPU) outside its convolutions. Three rewrites, each exact in real arithmetic:
//!
//! - **Powers as products.** `Pow(x, 2)` becomes `Mul(x, x)` and `Pow(x, 4)`
//!   `Mul(s, s)` with `s = Mul(x, x)`: ONNX Runtime's `Pow` is far slower than its `Mul`
//!   for the same values (38 % of `streamiq-tiny`'s time before this rewrite).
//! - **Variance from two means.** `ReduceMean((x - ReduceMean(x))²)` becomes
//!   `Relu(ReduceMean(x²) - ReduceMean(x)²)`, the square shared with a fourth power of
//!   the same `x`: no full-size deviation tensor and no broadcast `Sub` over it.
//! - **Global pooling.** `ReduceMean` over the two spatial axes of a 4-D tensor becomes
//!   `GlobalAveragePool` (then `Flatten` where the reduced axes are dropped). ONNX
//!   Runtime's CPU provider keeps its blocked channel layout (NCHWc) through that
//!   operator and through `Mul`, where a `ReduceMean` or a broadcast `Sub` makes it copy
//!   every stage's activations back to the plain layout first.
//!
//! Together they make a call of `streamiq-tiny` about 1.5x cheaper than the file as it
//! is (README, Performance); its embeddings move by about 1e-5 (unit-norm vectors, the
//! summation order changes). Nodes nothing reads any more (the deviations, their
//! squares, constants) are dropped.
//!
//! The file on disk is not changed (its sha256 stays the model's identity for labels and
//! prompt sets). The rewrite reads the protobuf wire format directly (prost's encoding
//! functions, no ONNX library) and touches only top-level nodes of the default domain
//! whose operands it can prove: exponents that are scalar float constants (not graph
//! inputs), axes that are constants, 4-D tensors that come from a 2-D convolution
//! through element-wise operators. Every other byte is copied as it was; a graph it
//! cannot follow (subgraphs, malformed bytes) is left alone.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use prost::encoding::{WireType, decode_key, decode_varint, encode_key, encode_varint};

/// What [`rewrite`] changed in a graph.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rewrites {
    /// `Pow` nodes of exponent 2 or 4 now computed as products.
    pub powers: usize,
    /// Variances now computed from the means of `x` and `x²`.
    pub variances: usize,
    /// Spatial `ReduceMean` nodes now `GlobalAveragePool`.
    pub global_pools: usize,
}

impl Rewrites {
    /// Whether anything was rewritten.
    pub fn any(&self) -> bool {
        self.powers + self.variances + self.global_pools > 0
    }
}

/// The model's bytes with the rewrites of this module applied, and what they changed;
/// the bytes as given (and nothing counted) where there is nothing to rewrite or the
/// graph cannot be followed.
pub fn rewrite(model: &[u8]) -> (Cow<'_, [u8]>, Rewrites) {
    match try_rewrite(model) {
        Some((bytes, done)) if done.any() => (Cow::Owned(bytes), done),
        _ => (Cow::Borrowed(model), Rewrites::default()),
    }
}

// ModelProto.graph; GraphProto.node, .initializer, .input, .output; NodeProto.input,
// .output, .name, .op_type, .attribute, .domain; AttributeProto.name, .f, .i, .t, .g,
// .ints, .graphs, .type; TensorProto.dims, .data_type, .float_data, .int64_data, .name,
// .raw_data; ValueInfoProto.name.
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
const ATTR_I: u32 = 3;
const ATTR_T: u32 = 5;
const ATTR_G: u32 = 6;
const ATTR_INTS: u32 = 8;
const ATTR_GRAPHS: u32 = 11;
const ATTR_TYPE: u32 = 20;
const TENSOR_DIMS: u32 = 1;
const TENSOR_DATA_TYPE: u32 = 2;
const TENSOR_FLOAT_DATA: u32 = 4;
const TENSOR_INT64_DATA: u32 = 7;
const TENSOR_NAME: u32 = 8;
const TENSOR_RAW_DATA: u32 = 9;
const VALUE_INFO_NAME: u32 = 1;
// TensorProto.DataType FLOAT and INT64; AttributeProto.AttributeType INT.
const FLOAT: u64 = 1;
const INT64: u64 = 7;
const ATTR_TYPE_INT: u64 = 2;
/// Constants with more elements than this are not decoded (weights are not needed).
const SMALL: u64 = 16;

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
    raw: &'a [u8],
    inputs: Vec<&'a str>,
    outputs: Vec<&'a str>,
    op_type: &'a str,
    /// Of the default domain (`""` or `"ai.onnx"`).
    plain: bool,
    /// The integer attributes `axes` (a list), `keepdims`, and the length of
    /// `kernel_shape`.
    axes: Option<Vec<i64>>,
    keepdims: Option<i64>,
    kernel_rank: Option<usize>,
    /// A `Constant` node's value, when small enough to be read.
    value: Option<Tensor<'a>>,
    has_subgraph: bool,
}

fn node(buf: &[u8]) -> Option<Node<'_>> {
    let mut n = Node {
        raw: buf,
        inputs: Vec::new(),
        outputs: Vec::new(),
        op_type: "",
        plain: true,
        axes: None,
        keepdims: None,
        kernel_rank: None,
        value: None,
        has_subgraph: false,
    };
    let mut attributes = Vec::new();
    for f in fields(buf)? {
        match f.number {
            NODE_INPUT => n.inputs.push(string_of(&f)?),
            NODE_OUTPUT => n.outputs.push(string_of(&f)?),
            NODE_OP_TYPE => n.op_type = string_of(&f)?,
            NODE_DOMAIN => n.plain = matches!(string_of(&f)?, "" | "ai.onnx"),
            NODE_ATTRIBUTE => attributes.push(bytes_of(&f)?),
            _ => {}
        }
    }
    for a in attributes {
        let fs = fields(a)?;
        let name = fs
            .iter()
            .find(|f| f.number == ATTR_NAME)
            .and_then(string_of);
        let mut ints = Vec::new();
        for f in &fs {
            match (name, f.number, &f.value) {
                (_, ATTR_G | ATTR_GRAPHS, _) => n.has_subgraph = true,
                (_, ATTR_INTS, Value::Varint(v)) => ints.push(*v as i64),
                (_, ATTR_INTS, Value::Bytes(packed)) => ints.extend(varints(packed)?),
                (Some("keepdims"), ATTR_I, Value::Varint(v)) => n.keepdims = Some(*v as i64),
                (Some("value"), ATTR_T, Value::Bytes(t)) if n.op_type == "Constant" => {
                    n.value = tensor(t)
                }
                (Some("value_float"), ATTR_F, Value::Fixed32(bits)) if n.op_type == "Constant" => {
                    n.value = Some(Tensor::scalar(f32::from_bits(*bits)))
                }
                _ => {}
            }
        }
        match name {
            Some("axes") => n.axes = Some(ints),
            Some("kernel_shape") => n.kernel_rank = Some(ints.len()),
            _ => {}
        }
    }
    Some(n)
}

/// Packed varints, as `i64` (ONNX's `int64` fields).
fn varints(mut packed: &[u8]) -> Option<Vec<i64>> {
    let mut out = Vec::new();
    while !packed.is_empty() {
        out.push(decode_varint(&mut packed).ok()? as i64);
    }
    Some(out)
}

/// What the rewrite reads of a TensorProto: its name, rank, and its values where it is a
/// small float or int64 tensor.
#[derive(Default)]
struct Tensor<'a> {
    name: &'a str,
    rank: usize,
    floats: Vec<f32>,
    int64s: Vec<i64>,
}

impl Tensor<'_> {
    fn scalar(v: f32) -> Self {
        Tensor {
            floats: vec![v],
            ..Tensor::default()
        }
    }

    /// The value of a one-element float tensor.
    fn float(&self) -> Option<f32> {
        match self.floats.as_slice() {
            [v] => Some(*v),
            _ => None,
        }
    }

    /// The values of a scalar or 1-D int64 tensor.
    fn ints(&self) -> Option<&[i64]> {
        (self.rank <= 1 && !self.int64s.is_empty()).then_some(&self.int64s)
    }
}

fn tensor(buf: &[u8]) -> Option<Tensor<'_>> {
    let mut t = Tensor::default();
    let (mut data_type, mut elements) = (0, 1u64);
    let mut data = Vec::new();
    for f in fields(buf)? {
        match (f.number, &f.value) {
            (TENSOR_DIMS, Value::Varint(d)) => {
                elements = elements.checked_mul(*d)?;
                t.rank += 1;
            }
            (TENSOR_DIMS, Value::Bytes(packed)) => {
                for d in varints(packed)? {
                    elements = elements.checked_mul(u64::try_from(d).ok()?)?;
                    t.rank += 1;
                }
            }
            (TENSOR_DATA_TYPE, Value::Varint(v)) => data_type = *v,
            (TENSOR_NAME, Value::Bytes(_)) => t.name = string_of(&f)?,
            (TENSOR_FLOAT_DATA | TENSOR_INT64_DATA | TENSOR_RAW_DATA, _) => data.push(f),
            _ => {}
        }
    }
    if elements > SMALL {
        return Some(t);
    }
    for f in data {
        match (data_type, f.number, &f.value) {
            (FLOAT, TENSOR_FLOAT_DATA, Value::Fixed32(bits)) => {
                t.floats.push(f32::from_bits(*bits))
            }
            (FLOAT, TENSOR_FLOAT_DATA | TENSOR_RAW_DATA, Value::Bytes(b)) => t.floats.extend(
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))),
            ),
            (INT64, TENSOR_INT64_DATA, Value::Varint(v)) => t.int64s.push(*v as i64),
            (INT64, TENSOR_INT64_DATA, Value::Bytes(packed)) => t.int64s.extend(varints(packed)?),
            (INT64, TENSOR_RAW_DATA, Value::Bytes(b)) => t.int64s.extend(
                b.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))),
            ),
            _ => {}
        }
    }
    // Values that do not match the element count are not trusted.
    if t.floats.len() as u64 != elements {
        t.floats.clear();
    }
    if t.int64s.len() as u64 != elements {
        t.int64s.clear();
    }
    Some(t)
}

/// A NodeProto's inputs, one output, and its name: the output's, which is unique.
fn node_head(inputs: &[&str], output: &str) -> Vec<u8> {
    let mut n = Vec::new();
    for i in inputs {
        put_bytes(&mut n, NODE_INPUT, i.as_bytes());
    }
    put_bytes(&mut n, NODE_OUTPUT, output.as_bytes());
    put_bytes(&mut n, NODE_NAME, output.as_bytes());
    n
}

/// A NodeProto of the default domain.
fn encode_node(op: &str, inputs: &[&str], output: &str, attributes: &[Vec<u8>]) -> Vec<u8> {
    let mut n = node_head(inputs, output);
    put_bytes(&mut n, NODE_OP_TYPE, op.as_bytes());
    for a in attributes {
        put_bytes(&mut n, NODE_ATTRIBUTE, a);
    }
    n
}

/// An integer AttributeProto.
fn int_attribute(name: &str, value: i64) -> Vec<u8> {
    let mut a = Vec::new();
    put_bytes(&mut a, ATTR_NAME, name.as_bytes());
    encode_key(ATTR_I, WireType::Varint, &mut a);
    encode_varint(value as u64, &mut a);
    encode_key(ATTR_TYPE, WireType::Varint, &mut a);
    encode_varint(ATTR_TYPE_INT, &mut a);
    a
}

/// A copy of a node with other inputs and output (its name follows the output); its
/// operator, domain and attributes are kept.
fn reencode(raw: &[u8], inputs: &[&str], output: &str) -> Option<Vec<u8>> {
    let mut n = node_head(inputs, output);
    for f in fields(raw)? {
        if !matches!(f.number, NODE_INPUT | NODE_OUTPUT | NODE_NAME) {
            n.extend_from_slice(f.raw);
        }
    }
    Some(n)
}

/// What a node of the rewritten graph is, for the counts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Kept,
    Helper,
    Power,
    Variance,
    GlobalPool,
}

/// A node of the rewritten graph.
struct Emitted<'a> {
    bytes: Cow<'a, [u8]>,
    inputs: Vec<Cow<'a, str>>,
    outputs: Vec<Cow<'a, str>>,
    kind: Kind,
}

/// The rewritten graph's nodes as they are made, with what later nodes need to know of
/// the tensors made so far.
struct Builder<'a> {
    out: Vec<Emitted<'a>>,
    /// Every tensor name in the graph, so that new ones are unique.
    names: HashSet<String>,
    /// Tensors known to be 4-D.
    rank4: HashSet<String>,
    /// `x` -> a tensor holding `x * x`.
    square_of: HashMap<String, String>,
}

impl<'a> Builder<'a> {
    fn fresh(&mut self, base: &str, what: &str) -> String {
        let mut name = format!("{base}__streamiq_{what}");
        while self.names.contains(&name) {
            name.push('_');
        }
        self.names.insert(name.clone());
        name
    }

    fn keep(&mut self, n: &Node<'a>) {
        // An operator of another domain may share a name, not the meaning.
        if n.plain {
            self.note(n.op_type, &n.inputs, n.outputs.first().copied());
        }
        self.out.push(Emitted {
            bytes: Cow::Borrowed(n.raw),
            inputs: n.inputs.iter().map(|s| Cow::Borrowed(*s)).collect(),
            outputs: n.outputs.iter().map(|s| Cow::Borrowed(*s)).collect(),
            kind: Kind::Kept,
        });
    }

    fn push(&mut self, kind: Kind, op: &str, inputs: &[&str], output: &str, attrs: &[Vec<u8>]) {
        self.push_bytes(
            kind,
            op,
            encode_node(op, inputs, output, attrs),
            inputs,
            output,
        );
    }

    fn push_bytes(&mut self, kind: Kind, op: &str, bytes: Vec<u8>, inputs: &[&str], output: &str) {
        self.note(op, inputs, Some(output));
        self.out.push(Emitted {
            bytes: Cow::Owned(bytes),
            inputs: inputs.iter().map(|s| Cow::Owned(s.to_string())).collect(),
            outputs: vec![Cow::Owned(output.to_owned())],
            kind,
        });
    }

    /// Follows squares and 4-D tensors through a node of the default domain.
    fn note(&mut self, op: &str, inputs: &[&str], output: Option<&str>) {
        let Some(out) = output else { return };
        let is4 = |s: &&str| self.rank4.contains(*s);
        let rank4 = match (op, inputs) {
            (
                "Relu" | "Clip" | "LeakyRelu" | "Sigmoid" | "HardSigmoid" | "HardSwish" | "Tanh"
                | "Elu" | "Selu" | "Abs" | "Neg" | "Sqrt" | "Identity" | "BatchNormalization",
                [x, ..],
            ) => is4(x),
            ("Add" | "Sub" | "Mul" | "Div" | "Max" | "Min", [a, b]) => is4(a) && is4(b),
            _ => false,
        };
        if rank4 {
            self.rank4.insert(out.to_owned());
        }
        if let ("Mul", [a, b]) = (op, inputs)
            && a == b
        {
            self.square_of
                .entry(a.to_string())
                .or_insert_with(|| out.to_owned());
        }
    }

    /// `x * x`, computed once.
    fn square(&mut self, x: &str, kind: Kind) -> String {
        if let Some(s) = self.square_of.get(x) {
            return s.clone();
        }
        let s = self.fresh(x, "square");
        self.push(kind, "Mul", &[x, x], &s, &[]);
        s
    }

    /// The mean of `x` over its two spatial axes as a `GlobalAveragePool` (4-D `x` whose
    /// reduced axes are {2, 3}), then `Flatten` unless the axes are kept.
    fn global_pool(&mut self, x: &str, axes: &[i64], keepdims: bool, output: &str) -> bool {
        if !self.rank4.contains(x) {
            return false;
        }
        let mut a: Vec<i64> = axes
            .iter()
            .map(|&a| if a < 0 { a + 4 } else { a })
            .collect();
        a.sort_unstable();
        if a != [2, 3] {
            return false;
        }
        if keepdims {
            self.push(Kind::GlobalPool, "GlobalAveragePool", &[x], output, &[]);
        } else {
            let pooled = self.fresh(output, "pooled");
            self.push(Kind::GlobalPool, "GlobalAveragePool", &[x], &pooled, &[]);
            let axis = int_attribute("axis", 1);
            self.push(Kind::Helper, "Flatten", &[&pooled], output, &[axis]);
        }
        true
    }
}

/// What the rewrite knows of the original graph.
struct Graph<'a> {
    nodes: Vec<Node<'a>>,
    /// Output name -> index of the node that makes it.
    producer: HashMap<&'a str, usize>,
    /// Constant values (Constant nodes, and initializers that are not graph inputs).
    constants: HashMap<&'a str, Tensor<'a>>,
    /// The rank of each initializer.
    initializer_rank: HashMap<&'a str, usize>,
}

impl<'a> Graph<'a> {
    fn made_by(&self, tensor: &str) -> Option<&Node<'a>> {
        self.producer.get(tensor).map(|&i| &self.nodes[i])
    }

    /// 2 or 4 where `n` is `Pow(x, 2)` or `Pow(x, 4)` with a constant exponent.
    fn power(&self, n: &Node) -> Option<u32> {
        match (n.plain, n.op_type, n.inputs.as_slice(), n.outputs.len()) {
            (true, "Pow", [_, e], 1) => match self.constants.get(e)?.float()? {
                2.0 => Some(2),
                4.0 => Some(4),
                _ => None,
            },
            _ => None,
        }
    }

    /// The constant axes of a `ReduceMean` or `Unsqueeze` (attribute or second input).
    fn axes(&self, n: &Node) -> Option<Vec<i64>> {
        match (&n.axes, n.inputs.get(1)) {
            (Some(a), None) => Some(a.clone()),
            (None, Some(input)) => self.constants.get(input)?.ints().map(<[i64]>::to_vec),
            _ => None,
        }
    }

    /// [`axes`](Self::axes), sorted.
    fn sorted_axes(&self, n: &Node) -> Option<Vec<i64>> {
        let mut a = self.axes(n)?;
        a.sort_unstable();
        Some(a)
    }

    /// `(x, mean, axes)` where `n` is `ReduceMean((x - mean)²)` over `axes` (sorted),
    /// `mean` a `ReduceMean(x)` over the same axes with the same `keepdims` (with the
    /// reduced axes put back by `Unsqueeze` where they were dropped). Axes must be
    /// non-negative.
    fn variance(&self, n: &Node) -> Option<(&'a str, &'a str, Vec<i64>)> {
        if !(n.plain && n.op_type == "ReduceMean" && n.outputs.len() == 1) {
            return None;
        }
        let axes = self.sorted_axes(n)?;
        if axes.first().is_none_or(|&a| a < 0) {
            return None;
        }
        let keepdims = n.keepdims.unwrap_or(1);
        let q = self.made_by(n.inputs.first()?)?;
        let d = match (q.plain, q.op_type, q.inputs.as_slice()) {
            (true, "Mul", [a, b]) if a == b => *a,
            (true, "Pow", [a, _]) if self.power(q) == Some(2) => *a,
            _ => return None,
        };
        let sub = self.made_by(d)?;
        let (true, "Sub", &[x, subtrahend]) = (sub.plain, sub.op_type, sub.inputs.as_slice())
        else {
            return None;
        };
        let mut b = subtrahend;
        // Unsqueeze layers from the outside in; the axes they put back, applied inside out.
        let mut layers = Vec::new();
        while let Some(u) = self
            .made_by(b)
            .filter(|u| u.plain && u.op_type == "Unsqueeze")
        {
            layers.push(self.sorted_axes(u)?);
            b = u.inputs.first()?;
        }
        let mean = self.made_by(b)?;
        let same = mean.plain
            && mean.op_type == "ReduceMean"
            && mean.inputs.first() == Some(&x)
            && mean.keepdims.unwrap_or(1) == keepdims
            && self.sorted_axes(mean)? == axes;
        if !same {
            return None;
        }
        let mut put_back: Vec<i64> = Vec::new();
        for layer in layers.into_iter().rev() {
            if layer.first().is_some_and(|&a| a < 0) {
                return None;
            }
            for p in layer {
                for m in put_back.iter_mut().filter(|m| **m >= p) {
                    *m += 1;
                }
                put_back.push(p);
            }
        }
        put_back.sort_unstable();
        let restored = if keepdims == 0 {
            put_back == axes
        } else {
            put_back.is_empty()
        };
        restored.then_some((x, b, axes))
    }
}

fn try_rewrite(model: &[u8]) -> Option<(Vec<u8>, Rewrites)> {
    let top = fields(model)?;
    let mut graphs = top.iter().filter(|f| f.number == MODEL_GRAPH);
    let graph = bytes_of(graphs.next()?)?;
    if graphs.next().is_some() {
        return None;
    }
    let gfields = fields(graph)?;
    let mut g = Graph {
        nodes: Vec::new(),
        producer: HashMap::new(),
        constants: HashMap::new(),
        initializer_rank: HashMap::new(),
    };
    let mut names: HashSet<String> = HashSet::new();
    let mut graph_outputs: HashSet<&str> = HashSet::new();
    // An initializer that is also a graph input is only a default: a caller may feed
    // another value.
    let mut graph_inputs: HashSet<&str> = HashSet::new();
    let mut initializers = Vec::new();
    for f in &gfields {
        match f.number {
            GRAPH_NODE => {
                let mut n = node(bytes_of(f)?)?;
                if n.has_subgraph {
                    // Names may be used from inside it: not followed.
                    return None;
                }
                for o in &n.outputs {
                    g.producer.insert(o, g.nodes.len());
                }
                if let (Some(v), [out]) = (n.value.take(), n.outputs.as_slice()) {
                    g.constants.insert(out, v);
                }
                names.extend(n.inputs.iter().chain(&n.outputs).map(|s| s.to_string()));
                g.nodes.push(n);
            }
            GRAPH_INITIALIZER => initializers.push(tensor(bytes_of(f)?)?),
            GRAPH_OUTPUT | GRAPH_INPUT => {
                let vi = fields(bytes_of(f)?)?;
                if let Some(name) = vi
                    .iter()
                    .find(|f| f.number == VALUE_INFO_NAME)
                    .and_then(string_of)
                {
                    names.insert(name.to_owned());
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
    for t in initializers {
        names.insert(t.name.to_owned());
        g.initializer_rank.insert(t.name, t.rank);
        if !graph_inputs.contains(t.name) {
            g.constants.insert(t.name, t);
        }
    }
    for i in &graph_inputs {
        g.constants.remove(i);
    }

    let mut b = Builder {
        out: Vec::with_capacity(g.nodes.len() + 16),
        names,
        rank4: HashSet::new(),
        square_of: HashMap::new(),
    };
    for n in &g.nodes {
        if let Some(e) = g.power(n) {
            let (x, y) = (n.inputs[0], n.outputs[0]);
            if e == 2 {
                b.push(Kind::Power, "Mul", &[x, x], y, &[]);
            } else {
                let s = b.square(x, Kind::Helper);
                b.push(Kind::Power, "Mul", &[&s, &s], y, &[]);
            }
            continue;
        }
        if let Some((x, mean, axes)) = g.variance(n) {
            let y = n.outputs[0];
            let keepdims = n.keepdims.unwrap_or(1) != 0;
            let s = b.square(x, Kind::Helper);
            let mean_of_square = b.fresh(y, "mean_of_square");
            if !b.global_pool(&s, &axes, keepdims, &mean_of_square) {
                let mut inputs = vec![s.as_str()];
                inputs.extend(n.inputs.iter().skip(1));
                let bytes = reencode(n.raw, &inputs, &mean_of_square)?;
                b.push_bytes(Kind::Helper, "ReduceMean", bytes, &inputs, &mean_of_square);
            }
            let square_of_mean = b.fresh(y, "square_of_mean");
            b.push(Kind::Helper, "Mul", &[mean, mean], &square_of_mean, &[]);
            let difference = b.fresh(y, "difference");
            b.push(
                Kind::Helper,
                "Sub",
                &[&mean_of_square, &square_of_mean],
                &difference,
                &[],
            );
            // Rounding may leave a variance of about 0 slightly negative.
            b.push(Kind::Variance, "Relu", &[&difference], y, &[]);
            continue;
        }
        if n.plain
            && n.op_type == "ReduceMean"
            && n.outputs.len() == 1
            && let (Some(axes), Some(x)) = (g.axes(n), n.inputs.first())
            && b.global_pool(x, &axes, n.keepdims.unwrap_or(1) != 0, n.outputs[0])
        {
            continue;
        }
        if n.plain && n.op_type == "Conv" {
            let weights = n.inputs.get(1).and_then(|w| g.initializer_rank.get(w));
            if n.kernel_rank == Some(2) || weights == Some(&4) {
                b.keep(n);
                b.rank4.insert(n.outputs[0].to_owned());
                continue;
            }
        }
        b.keep(n);
    }

    // Nodes nothing reads any more go, from the last one back.
    let mut used: HashSet<&str> = graph_outputs;
    let mut live = vec![false; b.out.len()];
    for (i, e) in b.out.iter().enumerate().rev() {
        if e.outputs.iter().any(|o| used.contains(o.as_ref())) {
            live[i] = true;
            used.extend(e.inputs.iter().map(|s| s.as_ref()));
        }
    }
    let mut done = Rewrites::default();
    let mut nodes_out = Vec::with_capacity(graph.len());
    for (e, _) in b.out.iter().zip(&live).filter(|(_, l)| **l) {
        match e.kind {
            Kind::Power => done.powers += 1,
            Kind::Variance => done.variances += 1,
            Kind::GlobalPool => done.global_pools += 1,
            Kind::Kept | Kind::Helper => {}
        }
        put_bytes(&mut nodes_out, GRAPH_NODE, &e.bytes);
    }
    if !done.any() {
        return Some((Vec::new(), done));
    }
    // The nodes go where the first one was; every other field is copied as it was.
    let mut graph_out = Vec::with_capacity(graph.len());
    let mut placed = false;
    for f in &gfields {
        if f.number != GRAPH_NODE {
            graph_out.extend_from_slice(f.raw);
        } else if !placed {
            graph_out.extend_from_slice(&nodes_out);
            placed = true;
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
    Some((out, done))
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
        encode_node(op, inputs, output, attr.as_slice())
    }

    fn constant(output: &str, value: f32) -> Vec<u8> {
        let mut a = Vec::new();
        put_bytes(&mut a, ATTR_NAME, b"value");
        put_bytes(&mut a, ATTR_T, &tensor("", value, true));
        node_bytes("Constant", &[], output, Some(a))
    }

    /// A Constant node holding a 1-D int64 tensor.
    fn int_constant(output: &str, values: &[i64]) -> Vec<u8> {
        let mut t = Vec::new();
        encode_key(TENSOR_DIMS, WireType::Varint, &mut t);
        encode_varint(values.len() as u64, &mut t);
        encode_key(TENSOR_DATA_TYPE, WireType::Varint, &mut t);
        encode_varint(INT64, &mut t);
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        put_bytes(&mut t, TENSOR_RAW_DATA, &raw);
        let mut a = Vec::new();
        put_bytes(&mut a, ATTR_NAME, b"value");
        put_bytes(&mut a, ATTR_T, &t);
        node_bytes("Constant", &[], output, Some(a))
    }

    /// An `ints` AttributeProto (packed, as ONNX's exporters write it).
    fn ints(name: &str, values: &[i64]) -> Vec<u8> {
        let mut a = Vec::new();
        put_bytes(&mut a, ATTR_NAME, name.as_bytes());
        let mut packed = Vec::new();
        for v in values {
            encode_varint(*v as u64, &mut packed);
        }
        put_bytes(&mut a, ATTR_INTS, &packed);
        a
    }

    /// `ReduceMean` over `axes` (opset 17's attribute).
    fn mean(x: &str, axes: &[i64], keepdims: i64, output: &str) -> Vec<u8> {
        let attrs = [ints("axes", axes), int_attribute("keepdims", keepdims)];
        encode_node("ReduceMean", &[x], output, &attrs)
    }

    /// The pooling of `streamiq-tiny`'s tower as PyTorch exports it, on a 2-D convolution's
    /// activations: mean, variance (reduced axes put back by `put_back` and `keepdims`)
    /// and fourth-power mean, with `axes` reduced.
    fn pooling(axes: &[i64], keepdims: i64, put_back: &[&[i64]]) -> Vec<u8> {
        let mut nodes = vec![
            encode_node(
                "Conv",
                &["pixels", "w"],
                "c",
                &[ints("kernel_shape", &[3, 3])],
            ),
            node_bytes("Relu", &["c"], "x", None),
            mean("x", axes, keepdims, "m"),
        ];
        let mut b = "m".to_string();
        for (i, a) in put_back.iter().enumerate() {
            nodes.push(int_constant(&format!("ua{i}"), a));
            nodes.push(node_bytes(
                "Unsqueeze",
                &[&b, &format!("ua{i}")],
                &format!("u{i}"),
                None,
            ));
            b = format!("u{i}");
        }
        nodes.extend([
            node_bytes("Sub", &["x", &b], "d", None),
            constant("two", 2.0),
            node_bytes("Pow", &["d", "two"], "d2", None),
            mean("d2", axes, keepdims, "v"),
            constant("four", 4.0),
            node_bytes("Pow", &["x", "four"], "x4", None),
            mean("x4", axes, keepdims, "p"),
            node_bytes(
                "Concat",
                &["m", "v", "p"],
                "y",
                Some(int_attribute("axis", 1)),
            ),
        ]);
        model(&nodes, &[])
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
        let (out, done) = rewrite(&m);
        assert_eq!(
            done,
            Rewrites {
                powers: 2,
                ..Rewrites::default()
            }
        );
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            ops(&out),
            vec![
                ("Constant".into(), s(&[]), "three".into()),
                ("Mul".into(), s(&["x", "x"]), "a".into()),
                ("Mul".into(), s(&["a", "a"]), "a__streamiq_square".into()),
                (
                    "Mul".into(),
                    s(&["a__streamiq_square", "a__streamiq_square"]),
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
        assert!(matches!(rewrite(&m), (Cow::Borrowed(_), r) if !r.any()));
        // A Pow whose exponent is computed, or a vector.
        let m = model(
            &[
                node_bytes("Shape", &["x"], "e", None),
                node_bytes("Pow", &["x", "e"], "y", None),
            ],
            &[],
        );
        assert!(!rewrite(&m).1.any());
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
        assert_eq!(rewrite(&m).1.powers, 1);
        put_bytes(&mut g, GRAPH_INPUT, &vi);
        m.clear();
        put_bytes(&mut m, MODEL_GRAPH, &g);
        assert!(!rewrite(&m).1.any());
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
        assert!(!rewrite(&m).1.any());
        // Malformed or truncated bytes: no panic, nothing rewritten.
        let m = model(
            &[
                constant("two", 2.0),
                node_bytes("Pow", &["x", "two"], "y", None),
            ],
            &[],
        );
        assert_eq!(rewrite(&m).1.powers, 1);
        for cut in 0..m.len() {
            let _ = rewrite(&m[..cut]);
        }
        assert!(!rewrite(&[0xff; 16]).1.any());
        assert!(!rewrite(b"").1.any());
    }

    #[test]
    fn variances_come_from_two_means_and_spatial_means_are_global_pools() {
        let m = pooling(&[2, 3], 0, &[&[2], &[3]]);
        let (out, done) = rewrite(&m);
        assert_eq!(
            done,
            Rewrites {
                powers: 1,
                variances: 1,
                global_pools: 3,
            }
        );
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let op = |o: &str, i: &[&str], out: &str| (o.to_string(), s(i), out.to_string());
        let sq = "x__streamiq_square";
        assert_eq!(
            ops(&out),
            vec![
                op("Conv", &["pixels", "w"], "c"),
                op("Relu", &["c"], "x"),
                op("GlobalAveragePool", &["x"], "m__streamiq_pooled"),
                op("Flatten", &["m__streamiq_pooled"], "m"),
                op("Mul", &["x", "x"], sq),
                op(
                    "GlobalAveragePool",
                    &[sq],
                    "v__streamiq_mean_of_square__streamiq_pooled"
                ),
                op(
                    "Flatten",
                    &["v__streamiq_mean_of_square__streamiq_pooled"],
                    "v__streamiq_mean_of_square"
                ),
                op("Mul", &["m", "m"], "v__streamiq_square_of_mean"),
                op(
                    "Sub",
                    &["v__streamiq_mean_of_square", "v__streamiq_square_of_mean"],
                    "v__streamiq_difference"
                ),
                op("Relu", &["v__streamiq_difference"], "v"),
                op("Mul", &[sq, sq], "x4"),
                op("GlobalAveragePool", &["x4"], "p__streamiq_pooled"),
                op("Flatten", &["p__streamiq_pooled"], "p"),
                op("Concat", &["m", "v", "p"], "y"),
            ]
        );
        // Kept axes: no Unsqueeze, no Flatten; the axes may come in any order.
        let m = pooling(&[3, 2], 1, &[]);
        let (out, done) = rewrite(&m);
        assert_eq!((done.variances, done.global_pools), (1, 3));
        assert!(
            !ops(&out)
                .iter()
                .any(|(o, _, _)| o == "Flatten" || o == "Unsqueeze")
        );
        // Axes put back in one Unsqueeze.
        assert_eq!(rewrite(&pooling(&[2, 3], 0, &[&[2, 3]])).1.variances, 1);
    }

    #[test]
    fn pooling_it_cannot_prove_is_left_as_it_was() {
        // The mean put back on the wrong axes: a broadcast this rewrite must not assume.
        let m = pooling(&[2, 3], 0, &[&[1], &[3]]);
        let (out, done) = rewrite(&m);
        assert_eq!(done.variances, 0);
        assert!(ops(&out).iter().any(|(o, i, _)| o == "Sub" && i[0] == "x"));
        // Keepdims 0 with nothing put back, or the axes put back although kept.
        assert_eq!(rewrite(&pooling(&[2, 3], 0, &[])).1.variances, 0);
        assert_eq!(rewrite(&pooling(&[2, 3], 1, &[&[2], &[3]])).1.variances, 0);
        // Other axes: still a variance, but no global pool.
        let (_, done) = rewrite(&pooling(&[1, 2], 0, &[&[1], &[2]]));
        assert_eq!(
            done,
            Rewrites {
                powers: 1,
                variances: 1,
                global_pools: 0,
            }
        );
        // A variance over other axes than the mean's.
        let mut m = pooling(&[2, 3], 0, &[&[2], &[3]]);
        let from = mean("d2", &[2, 3], 0, "v");
        let to = mean("d2", &[2, 2], 0, "v");
        let at = m
            .windows(from.len())
            .position(|w| w == from.as_slice())
            .unwrap();
        m.splice(at..at + from.len(), to);
        assert_eq!(rewrite(&m).1.variances, 0);
        // A Relu of another domain does not carry the 4-D shape on.
        let mut relu = node_bytes("Relu", &["c"], "x", None);
        put_bytes(&mut relu, NODE_DOMAIN, b"com.example");
        let m = model(
            &[
                encode_node(
                    "Conv",
                    &["pixels", "w"],
                    "c",
                    &[ints("kernel_shape", &[3, 3])],
                ),
                relu,
                mean("x", &[2, 3], 0, "y"),
            ],
            &[],
        );
        assert!(!rewrite(&m).1.any());
        // Tensors not known to be 4-D: the variance is rewritten, no global pool.
        let m = model(
            &[
                mean("x", &[2, 3], 1, "m"),
                node_bytes("Sub", &["x", "m"], "d", None),
                node_bytes("Mul", &["d", "d"], "d2", None),
                mean("d2", &[2, 3], 1, "y"),
            ],
            &[],
        );
        let (out, done) = rewrite(&m);
        assert_eq!(
            done,
            Rewrites {
                variances: 1,
                ..Rewrites::default()
            }
        );
        let means: Vec<_> = ops(&out)
            .into_iter()
            .filter(|(o, _, _)| o == "ReduceMean")
            .collect();
        assert_eq!(means.len(), 2);
        assert_eq!(means[1].1, vec!["x__streamiq_square".to_string()]);
    }
}
