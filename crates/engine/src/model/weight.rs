//! Weight matrices kept in the precision they were stored in.
//!
//! A 1–8B model does not fit in memory as f32, so GGUF block-quantized tensors and f16/bf16
//! safetensors stay as they are; products dequantize a strip of the matrix at a time straight
//! into the panels the kernel of `matmul.rs` reads (few-row products, for decoding, use
//! `decode_dot.rs`). Salience needs two products per matrix: `x Wᵀ` (forward) and `dy W` (the
//! input gradient; never a weight gradient).

use std::mem::MaybeUninit;
use std::sync::Arc;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, CpuStorage, DType, Device, Result, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::decode_dot::{self, Activations, Kernel};
use super::kernels::with_slice;
use super::matmul::{self, ColumnPart, PackedRows, PanelSource, RowMaker, Span, NR};

/// How one stored matrix (rows = output features, cols = input features) is held.
#[derive(Clone)]
enum Stored {
    F32(Tensor),
    /// An f16 or bf16 tensor, e.g. from safetensors.
    Half(Tensor),
    /// GGUF data: block-quantized, or f16/bf16.
    Blocks(Arc<QTensor>),
}

#[derive(Clone)]
struct Matrix {
    stored: Stored,
    rows: usize,
    cols: usize,
}

/// A weight matrix (rows = output features), possibly several stored matrices stacked by rows
/// (q, k and v; gate and up), each in its own precision.
#[derive(Clone)]
pub struct Weight {
    parts: Vec<Matrix>,
    rows: usize,
    cols: usize,
}

/// Numbers without padding or invalid bit patterns, which may be viewed as bytes.
trait Plain: Copy {}
impl Plain for f32 {}
impl Plain for f16 {}
impl Plain for bf16 {}

/// The bytes of a slice of plain numbers (little-endian on every CPU this runs on).
fn bytes_of<T: Plain>(v: &[T]) -> &[u8] {
    // SAFETY: `Plain` types have no padding, and every byte of them is initialized.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// The stored values of one matrix, borrowed for the duration of a product.
#[derive(Clone, Copy)]
enum Values<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    Blocks(&'a [u8], GgmlDType),
}

impl Weight {
    /// A matrix held as f32.
    pub fn dense(t: Tensor) -> Result<Self> {
        let t = t.to_dtype(DType::F32)?.contiguous()?;
        Self::one(Stored::F32(t))
    }

    /// A matrix from a tensor in its own dtype: f32 stays f32, f16/bf16 stay half.
    pub fn from_tensor(t: Tensor) -> Result<Self> {
        match t.dtype() {
            DType::F16 | DType::BF16 => Self::one(Stored::Half(t.contiguous()?)),
            _ => Self::dense(t),
        }
    }

    /// A matrix from GGUF data, kept as stored (f32 data becomes a plain tensor).
    pub fn from_qtensor(q: QTensor) -> Result<Self> {
        if q.dtype() == GgmlDType::F32 {
            return Self::dense(q.dequantize(&Device::Cpu)?);
        }
        if q.shape().rank() != 2 {
            bail!(
                "a weight matrix must have two dimensions, got {:?}",
                q.shape()
            )
        }
        Self::one(Stored::Blocks(Arc::new(q)))
    }

    fn one(stored: Stored) -> Result<Self> {
        let (rows, cols) = match &stored {
            Stored::F32(t) | Stored::Half(t) => t.dims2()?,
            Stored::Blocks(q) => q.shape().dims2()?,
        };
        Ok(Self {
            parts: vec![Matrix { stored, rows, cols }],
            rows,
            cols,
        })
    }

    /// Stacks matrices with the same number of columns by rows. Adjacent f32 parts are joined
    /// into one tensor so that candle multiplies them in one call.
    pub fn stack(weights: Vec<Weight>) -> Result<Self> {
        let cols = match weights.first() {
            Some(w) => w.cols,
            None => bail!("stacking no weights"),
        };
        let mut parts: Vec<Matrix> = Vec::new();
        for w in weights {
            if w.cols != cols {
                bail!("stacking weights of {} and {cols} columns", w.cols)
            }
            for p in w.parts {
                match (parts.last_mut(), &p.stored) {
                    (
                        Some(Matrix {
                            stored: Stored::F32(prev),
                            rows,
                            ..
                        }),
                        Stored::F32(next),
                    ) => {
                        *prev = Tensor::cat(&[&*prev, next], 0)?;
                        *rows += p.rows;
                    }
                    _ => parts.push(p),
                }
            }
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        Ok(Self { parts, rows, cols })
    }

    /// Rows `start..start + len`, keeping each part's storage (used to split fused tensors).
    pub fn narrow_rows(&self, start: usize, len: usize) -> Result<Self> {
        let mut parts = Vec::new();
        let mut offset = 0;
        for p in &self.parts {
            let (lo, hi) = (start.max(offset), (start + len).min(offset + p.rows));
            if lo < hi {
                parts.push(p.narrow_rows(lo - offset, hi - lo)?);
            }
            offset += p.rows;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        if rows != len {
            bail!(
                "rows {start}..{} of a {}-row weight",
                start + len,
                self.rows
            )
        }
        Ok(Self {
            parts,
            rows,
            cols: self.cols,
        })
    }

    /// Reorders rows: output row `i` is input row `order[i]` (undoing llama.cpp's rotary
    /// permutation, for example). Quantized rows move as bytes.
    pub fn permute_rows(&self, order: &[usize]) -> Result<Self> {
        if self.parts.len() != 1 || order.len() != self.rows {
            bail!("permute_rows needs one stored matrix and one index per row")
        }
        let p = &self.parts[0];
        let stored = match &p.stored {
            Stored::F32(t) | Stored::Half(t) => {
                let idx: Vec<u32> = order.iter().map(|&i| i as u32).collect();
                let t = t.index_select(&Tensor::new(idx.as_slice(), &Device::Cpu)?, 0)?;
                if p.is_half() {
                    Stored::Half(t)
                } else {
                    Stored::F32(t)
                }
            }
            Stored::Blocks(q) => {
                let data = q.data()?;
                let row_bytes = data.len() / p.rows;
                let mut out = Vec::with_capacity(data.len());
                for &r in order {
                    out.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
                }
                Stored::Blocks(Arc::new(qtensor_from_bytes(
                    out,
                    q.dtype(),
                    (p.rows, p.cols),
                )?))
            }
        };
        Self::one(stored)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes the stored values take.
    pub fn stored_bytes(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match &p.stored {
                Stored::F32(t) | Stored::Half(t) => t.elem_count() * t.dtype().size_in_bytes(),
                Stored::Blocks(q) => q.storage_size_in_bytes(),
            })
            .sum()
    }

    /// Whether every part is f32 (nothing is dequantized on the fly).
    pub fn is_f32(&self) -> bool {
        self.parts
            .iter()
            .all(|p| matches!(p.stored, Stored::F32(_)))
    }

    /// Names of the stored precisions, e.g. "q4_k+q6_k".
    pub fn precision(&self) -> String {
        let mut names: Vec<String> = self.parts.iter().map(|p| p.precision()).collect();
        names.dedup();
        names.join("+")
    }

    /// The whole matrix as f32 (tests, and the small vectors of a model).
    pub fn to_f32(&self) -> Result<Tensor> {
        let parts: Vec<Tensor> = self
            .parts
            .iter()
            .map(|p| p.to_f32())
            .collect::<Result<_>>()?;
        Tensor::cat(&parts, 0)
    }

    /// Whether every stored value is finite (corrupt files show NaN or infinity), checked
    /// row by row without a full f32 copy.
    pub fn all_finite(&self) -> Result<bool> {
        for p in &self.parts {
            let cols = p.cols;
            let ok = p.with_values(|values| {
                Ok((0..p.rows)
                    .into_par_iter()
                    .map_init(
                        || vec![0f32; cols],
                        |row, r| {
                            dequantize(&values, cols, r, 0, cols, row);
                            // Without an early exit, so that the compiler vectorizes it: the
                            // check with one was 13 % of loading and prefilling a 1B model.
                            row.iter().fold(true, |finite, x| finite & x.is_finite())
                        },
                    )
                    .all(|finite| finite))
            })?;
            if !ok {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The same matrix, every part converted to f32: the plain reference for the panel products.
    pub fn dequantized(&self) -> Result<Self> {
        Self::dense(self.to_f32()?)
    }

    /// x Wᵀ for x of shape (.., cols): (.., rows), exact up to f32 rounding.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Activations::Exact)
    }

    /// `forward`, taking the activations as `activations` says: `Activations::best()` rounds
    /// them to 15 bits for the matrices with integer dots (`decode_dot::integer`; up to
    /// `decode_dot::MAX_INPUT_ROWS` rows) and, for more rows, for matrices that are all GGUF
    /// blocks the integer prefill takes, where it runs (`decode_dot::prefill`,
    /// `takes_integer_prefill`). Only generation asks for it.
    pub fn forward_with(&self, x: &Tensor, activations: Activations) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let n = x.elem_count() / self.cols;
        let x2 = x.reshape((n, self.cols))?;
        let y = if takes_integer_prefill(&self.parts, n, activations) {
            integer_prefill(&self.parts, &x2, n)?
        } else if self.forward_on_panels(n) {
            panel_forward(&self.parts, &x2, n)?
        } else if let Some(y) =
            few_rows_forward(&self.parts, &x2, n, (Kernel::best(), activations))?
        {
            y
        } else {
            let outs: Vec<Tensor> = self
                .parts
                .iter()
                .map(|p| p.forward(&x2, n, activations))
                .collect::<Result<_>>()?;
            if outs.len() == 1 {
                outs.into_iter().next().expect("one part")
            } else {
                Tensor::cat(&outs, 1)?
            }
        };
        let mut out_dims = dims;
        *out_dims.last_mut().expect("x has a last dimension") = self.rows;
        y.reshape(out_dims)
    }

    /// `forward` of the (n, cols) matrix whose rows `row(i, dst)` makes: on the panel kernel
    /// they go straight into its packed layout, never stored as a matrix (a pass over memory
    /// less per product); otherwise they are made into a matrix first. (n, rows).
    pub fn forward_rows(
        &self,
        n: usize,
        row: &RowMaker<'_>,
        activations: Activations,
    ) -> Result<Tensor> {
        if self.forward_on_panels(n) && !takes_integer_prefill(&self.parts, n, activations) {
            let packed = PackedRows::from_rows(n, self.cols, row);
            return panel_forward_packed(&self.parts, &packed, n);
        }
        let x = super::kernels::made_rows(n, self.cols, row);
        self.forward_with(
            &Tensor::from_vec(x, (n, self.cols), &Device::Cpu)?,
            activations,
        )
    }

    /// dy W for dy of shape (n, rows): (n, cols). The input gradient of `forward`.
    pub fn backward(&self, dy: &Tensor) -> Result<Tensor> {
        let n = dy.elem_count() / self.rows;
        let dy = dy.reshape((n, self.rows))?;
        if !self.has_f32_part() {
            return panel_backward(&self.parts, &dy, n);
        }
        let mut offset = 0;
        let mut total: Option<Tensor> = None;
        for p in &self.parts {
            let part_dy = if self.parts.len() == 1 {
                dy.clone()
            } else {
                dy.narrow(1, offset, p.rows)?.contiguous()?
            };
            let dx = p.backward(&part_dy, n)?;
            total = Some(match total {
                None => dx,
                Some(t) => (t + dx)?,
            });
            offset += p.rows;
        }
        total.ok_or_else(|| candle_core::Error::Msg("empty weight".into()))
    }

    /// `backward` of the (n, rows) gradient whose rows `row(i, dst)` makes: on the panel
    /// kernel they go straight into each stored part's packed operand, never stored as a
    /// matrix; otherwise they are made into a matrix first. (n, cols).
    pub fn backward_rows(&self, n: usize, row: &RowMaker<'_>) -> Result<Tensor> {
        if self.has_f32_part() {
            let dy = super::kernels::made_rows(n, self.rows, row);
            return self.backward(&Tensor::from_vec(dy, (n, self.rows), &Device::Cpu)?);
        }
        let widths: Vec<usize> = self.parts.iter().map(|p| p.rows).collect();
        let packed = PackedRows::from_rows_split(n, &widths, row);
        panel_backward_packed(&self.parts, packed, n)
    }

    /// Whether `forward` of n rows runs on the panel kernel (else on the few-rows kernels of
    /// `decode_dot`, or on candle's for f32 parts).
    fn forward_on_panels(&self, n: usize) -> bool {
        n > decode_dot::MAX_INPUT_ROWS && !self.has_f32_part()
    }

    /// Whether a part is a plain f32 tensor (multiplied by candle, not the panel kernel).
    fn has_f32_part(&self) -> bool {
        self.parts.iter().any(Matrix::is_f32)
    }

    /// Rows `r0..r1` as f32, one after another, into `dst` ((r1 - r0) * cols values).
    pub fn rows_into(&self, r0: usize, r1: usize, dst: &mut [f32]) -> Result<()> {
        let cols = self.cols;
        if r1 > self.rows || r0 > r1 || dst.len() < (r1 - r0) * cols {
            bail!("rows {r0}..{r1} of a {}-row matrix", self.rows)
        }
        let mut base = 0;
        for p in &self.parts {
            let (lo, hi) = (r0.max(base), r1.min(base + p.rows));
            if lo < hi {
                p.with_values(|v| {
                    for row in lo..hi {
                        let at = (row - r0) * cols;
                        dequantize(&v, cols, row - base, 0, cols, &mut dst[at..at + cols]);
                    }
                    Ok(())
                })?;
            }
            base += p.rows;
        }
        Ok(())
    }

    /// Rows `ids` as f32 (n, cols): embedding lookups.
    pub fn select_rows(&self, ids: &[u32]) -> Result<Tensor> {
        if let [Matrix {
            stored: Stored::F32(t),
            ..
        }] = self.parts.as_slice()
        {
            return t.index_select(&Tensor::new(ids, &Device::Cpu)?, 0);
        }
        let cols = self.cols;
        let mut out = vec![0f32; ids.len() * cols];
        for (&id, dst) in ids.iter().zip(out.chunks_mut(cols)) {
            let id = id as usize;
            if id >= self.rows {
                bail!("token id {id} is outside the {}-row table", self.rows)
            }
            self.rows_into(id, id + 1, dst)?;
        }
        Tensor::from_vec(out, (ids.len(), cols), &Device::Cpu)
    }
}

impl Matrix {
    fn is_half(&self) -> bool {
        matches!(self.stored, Stored::Half(_))
    }

    fn precision(&self) -> String {
        match &self.stored {
            Stored::F32(_) => "f32".into(),
            Stored::Half(t) => format!("{:?}", t.dtype()).to_lowercase(),
            Stored::Blocks(q) => format!("{:?}", q.dtype()).to_lowercase(),
        }
    }

    fn to_f32(&self) -> Result<Tensor> {
        match &self.stored {
            Stored::F32(t) => Ok(t.clone()),
            Stored::Half(t) => t.to_dtype(DType::F32),
            Stored::Blocks(q) => q.dequantize(&Device::Cpu),
        }
    }

    fn narrow_rows(&self, start: usize, len: usize) -> Result<Matrix> {
        if start == 0 && len == self.rows {
            return Ok(self.clone());
        }
        let stored = match &self.stored {
            Stored::F32(t) => Stored::F32(t.narrow(0, start, len)?.contiguous()?),
            Stored::Half(t) => Stored::Half(t.narrow(0, start, len)?.contiguous()?),
            Stored::Blocks(q) => {
                let data = q.data()?;
                let row_bytes = data.len() / self.rows;
                let bytes = data[start * row_bytes..(start + len) * row_bytes].to_vec();
                Stored::Blocks(Arc::new(qtensor_from_bytes(
                    bytes,
                    q.dtype(),
                    (len, self.cols),
                )?))
            }
        };
        Ok(Matrix {
            stored,
            rows: len,
            cols: self.cols,
        })
    }

    /// Runs `f` on the stored values.
    fn with_values<R>(&self, f: impl FnOnce(Values) -> Result<R>) -> Result<R> {
        match &self.stored {
            Stored::F32(t) => with_slice(t, |s| f(Values::F32(s))),
            Stored::Half(t) => {
                let (storage, layout) = t.storage_and_layout();
                let Some((start, end)) = layout.contiguous_offsets() else {
                    bail!("half weight is not contiguous")
                };
                match &*storage {
                    Storage::Cpu(CpuStorage::F16(v)) => f(Values::F16(&v[start..end])),
                    Storage::Cpu(CpuStorage::BF16(v)) => f(Values::BF16(&v[start..end])),
                    _ => bail!("half weights live on the CPU as f16 or bf16"),
                }
            }
            Stored::Blocks(q) => {
                let data = q.data()?;
                f(Values::Blocks(&data, q.dtype()))
            }
        }
    }

    fn is_f32(&self) -> bool {
        matches!(self.stored, Stored::F32(_))
    }

    fn forward(&self, x: &Tensor, n: usize, activations: Activations) -> Result<Tensor> {
        let dots = (n <= decode_dot::MAX_INPUT_ROWS).then(|| (Kernel::best(), activations));
        self.forward_using(x, n, dots)
    }

    /// `dots`: the few-rows kernels of `decode_dot` and how they take the activations, or None
    /// for the panel product.
    fn forward_using(
        &self,
        x: &Tensor,
        n: usize,
        dots: Option<(Kernel, Activations)>,
    ) -> Result<Tensor> {
        if let Stored::F32(w) = &self.stored {
            return x.matmul(&w.t()?);
        }
        let Some((kernel, activations)) = dots else {
            return panel_forward(std::slice::from_ref(self), x, n);
        };
        let (rows, cols) = (self.rows, self.cols);
        let out = with_slice(x, |x| {
            self.with_values(|values| {
                let blocks = match values {
                    Values::Blocks(bytes, dtype) => Some((bytes, dtype)),
                    Values::F16(v) => Some((bytes_of(v), GgmlDType::F16)),
                    Values::BF16(v) => Some((bytes_of(v), GgmlDType::BF16)),
                    Values::F32(_) => None,
                };
                let row = |r: usize, dst: &mut [f32]| dequantize(&values, cols, r, 0, cols, dst);
                let part = decode_dot::Part {
                    blocks,
                    rows,
                    dequantize_row: &row,
                };
                Ok(decode_dot::product(&[part], cols, x, kernel, activations))
            })
        })?;
        Tensor::from_vec(out, (n, rows), &Device::Cpu)
    }

    fn backward(&self, dy: &Tensor, n: usize) -> Result<Tensor> {
        if let Stored::F32(w) = &self.stored {
            return dy.matmul(w);
        }
        panel_backward(std::slice::from_ref(self), dy, n)
    }

    /// Writes dy W, for dy packed, into `out` (n × cols); with `accumulate` (`out` then holds
    /// values written before) adds it.
    fn backward_into(
        &self,
        dy: &PackedRows,
        out: &mut [MaybeUninit<f32>],
        accumulate: bool,
        kernel: Kernel,
    ) -> Result<()> {
        self.with_values(|values| {
            let source = Direct {
                values: &values,
                cols: self.cols,
            };
            if accumulate {
                // SAFETY: the caller says every value of `out` was written.
                let out = unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) };
                matmul::product(dy, &source, self.cols, out, self.cols, true, kernel);
            } else {
                matmul::product_uninit(dy, &source, self.cols, out, self.cols, kernel);
            }
            Ok(())
        })
    }
}

/// x Wᵀ for x (n, cols) and W the `parts` stacked by rows, none of them f32, on the panel
/// kernel: x is packed once, and each part writes its columns of one output.
fn panel_forward(parts: &[Matrix], x: &Tensor, n: usize) -> Result<Tensor> {
    let cols = parts[0].cols;
    with_slice(x, |x| {
        panel_forward_packed(parts, &PackedRows::new(x, cols, n, cols), n)
    })
}

/// `panel_forward` of x already packed.
fn panel_forward_packed(parts: &[Matrix], packed: &PackedRows, n: usize) -> Result<Tensor> {
    let rows = parts.iter().map(|p| p.rows).sum();
    let mut out = matmul::uninit(n * rows);
    with_all_values(parts, |values| {
        let sources: Vec<Transposed> = parts
            .iter()
            .zip(values)
            .map(|(p, values)| Transposed {
                values,
                cols: p.cols,
            })
            .collect();
        let mut at = 0;
        let columns: Vec<ColumnPart> = parts
            .iter()
            .zip(&sources)
            .map(|(p, source)| {
                at += p.rows;
                ColumnPart {
                    source,
                    columns: p.rows,
                    at: at - p.rows,
                }
            })
            .collect();
        matmul::product_of_parts_uninit(packed, &columns, &mut out, rows, Kernel::best());
        Ok(())
    })?;
    // SAFETY: the parts' rows add up to `rows`: every column of `out` was written.
    let out = unsafe { matmul::assume_init(out) };
    Tensor::from_vec(out, (n, rows), &Device::Cpu)
}

/// Runs `f` on the stored values of every part at once.
fn with_all_values<R>(parts: &[Matrix], f: impl FnOnce(&[Values]) -> Result<R>) -> Result<R> {
    fn nest<R>(
        parts: &[Matrix],
        got: &[Values],
        f: &mut dyn FnMut(&[Values]) -> Result<R>,
    ) -> Result<R> {
        match parts.split_first() {
            None => f(got),
            Some((first, rest)) => first.with_values(|values| {
                let mut all = got.to_vec();
                all.push(values);
                nest(rest, &all, f)
            }),
        }
    }
    let mut f = Some(f);
    nest(parts, &[], &mut |values| {
        (f.take().expect("the innermost part calls it once"))(values)
    })
}

/// dy W for dy (n, rows) and W the `parts` stacked by rows, none of them f32, on the panel
/// kernel: each part reads its columns of dy in place and adds its share to one output.
fn panel_backward(parts: &[Matrix], dy: &Tensor, n: usize) -> Result<Tensor> {
    let rows = parts.iter().map(|p| p.rows).sum();
    with_slice(dy, |dy| {
        // Packed one part at a time, as each is multiplied.
        let mut offset = 0;
        let packed = parts.iter().map(|p| {
            let part = PackedRows::new(&dy[offset..], rows, n, p.rows);
            offset += p.rows;
            part
        });
        panel_backward_packed(parts, packed, n)
    })
}

/// `panel_backward` of dy already packed, one operand per part (its columns of dy).
fn panel_backward_packed(
    parts: &[Matrix],
    packed: impl IntoIterator<Item = PackedRows>,
    n: usize,
) -> Result<Tensor> {
    let cols = parts[0].cols;
    let mut out = matmul::uninit(n * cols);
    for (i, (p, dy)) in parts.iter().zip(packed).enumerate() {
        p.backward_into(&dy, &mut out, i > 0, Kernel::best())?;
    }
    // SAFETY: the first part wrote every value (a weight has at least one part).
    let out = unsafe { matmul::assume_init(out) };
    Tensor::from_vec(out, (n, cols), &Device::Cpu)
}

/// Wᵀ as the right operand of x Wᵀ: B[k][j] = W[j][k]. Depth runs along the stored rows, so
/// chunks start on quantization blocks.
struct Transposed<'a> {
    values: &'a Values<'a>,
    cols: usize,
}

impl PanelSource for Transposed<'_> {
    fn depth_align(&self) -> usize {
        self.values.block_size()
    }

    fn pack(&self, span: Span, dst: &mut [f32], rows: &mut Vec<f32>) {
        let Span { k0, k1, j0, j1 } = span;
        // NR stored rows at a time into `rows`, then one pass that writes each panel row whole.
        let kl = k1 - k0;
        rows.resize(NR * kl, 0.0);
        for (panel, r0) in (j0..j1).step_by(NR).enumerate() {
            let width = NR.min(j1 - r0);
            for (r, row) in (r0..r0 + width).zip(rows.chunks_exact_mut(kl)) {
                dequantize(self.values, self.cols, r, k0, k1, row);
            }
            let panel = &mut dst[panel * kl * NR..(panel + 1) * kl * NR];
            matmul::transpose_into_panel(&rows[..width * kl], kl, panel, Kernel::best());
        }
    }

    fn prefetch(&self, Span { k0, k1, j0, j1 }: Span) {
        self.values.prefetch(self.cols, j0..j1, k0, k1);
    }
}

// Direct panels are filled by runs of half a block.
const _: () = assert!(NR == decode_dot::HALF);

/// W as the right operand of dy W: B[k][j] = W[k][j]. Columns run along the stored rows, so
/// strips start on quantization blocks.
struct Direct<'a> {
    values: &'a Values<'a>,
    cols: usize,
}

impl PanelSource for Direct<'_> {
    fn column_align(&self) -> usize {
        self.values.block_size()
    }

    fn pack(&self, span: Span, dst: &mut [f32], row: &mut Vec<f32>) {
        let Span { k0, k1, j0, j1 } = span;
        let kl = k1 - k0;
        if let Values::Blocks(bytes, dtype) = self.values {
            // Straight into the panels where the format has a fast dequantization.
            let size = dtype.type_size();
            let per_row = self.cols / dtype.block_size() * size;
            let (b0, b1) = (
                j0 / dtype.block_size() * size,
                j1 / dtype.block_size() * size,
            );
            if (j1 - j0).is_multiple_of(dtype.block_size())
                && decode_dot::has_fast_dequantization(*dtype)
            {
                // All or none: the register kernel exists on this CPU or it does not.
                let direct = (k0..k1).all(|k| {
                    let blocks = &bytes[k * per_row + b0..k * per_row + b1];
                    let out = &mut dst[(k - k0) * NR..];
                    decode_dot::dequantize_blocks_strided(blocks, *dtype, out, kl * NR)
                });
                if direct {
                    return;
                }
            }
        }
        row.resize(j1 - j0, 0.0);
        for k in k0..k1 {
            dequantize(self.values, self.cols, k, j0, j1, row);
            matmul::row_into_panels(row, k - k0, kl, dst);
        }
    }

    fn prefetch(&self, Span { k0, k1, j0, j1 }: Span) {
        self.values.prefetch(self.cols, k0..k1, j0, j1);
    }
}

impl Values<'_> {
    /// Values per quantization block: products cut rows only on these boundaries.
    fn block_size(&self) -> usize {
        match self {
            Values::Blocks(_, dtype) => dtype.block_size(),
            _ => 1,
        }
    }

    /// Starts loading the stored bytes of columns c0..c1 (on block boundaries) of `rows`.
    fn prefetch(&self, cols: usize, rows: std::ops::Range<usize>, c0: usize, c1: usize) {
        let (bytes, per_block, block) = match self {
            Values::F32(v) => (bytes_of(v), 4, 1),
            Values::F16(v) => (bytes_of(v), 2, 1),
            Values::BF16(v) => (bytes_of(v), 2, 1),
            Values::Blocks(b, dtype) => (*b, dtype.type_size(), dtype.block_size()),
        };
        let row_bytes = cols / block * per_block;
        for r in rows {
            let at = r * row_bytes;
            let span = at + c0 / block * per_block..at + c1 / block * per_block;
            if let Some(segment) = bytes.get(span) {
                matmul::prefetch_bytes(segment);
            }
        }
    }
}

/// A (rows, cols) GGUF tensor from its raw row-major blocks.
pub fn qtensor_from_bytes(
    bytes: Vec<u8>,
    dtype: GgmlDType,
    dims: (usize, usize),
) -> Result<QTensor> {
    let storage = candle_core::quantized::QStorage::from_data(
        std::borrow::Cow::Owned(bytes),
        &Device::Cpu,
        dtype,
    )?;
    QTensor::new(storage, dims)
}

/// Writes columns c0..c1 of row `row` (of a matrix with `cols` columns) as f32 into `dst`.
/// For block types, c0 and c1 lie on block boundaries.
fn dequantize(values: &Values, cols: usize, row: usize, c0: usize, c1: usize, dst: &mut [f32]) {
    let dst = &mut dst[..c1 - c0];
    let at = row * cols;
    match values {
        Values::F32(v) => dst.copy_from_slice(&v[at + c0..at + c1]),
        Values::F16(v) => {
            for (d, s) in dst.iter_mut().zip(&v[at + c0..at + c1]) {
                *d = s.to_f32();
            }
        }
        Values::BF16(v) => {
            for (d, s) in dst.iter_mut().zip(&v[at + c0..at + c1]) {
                *d = s.to_f32();
            }
        }
        Values::Blocks(bytes, dtype) => {
            macro_rules! blocks {
                ($($variant:ident => $block:ty),* $(,)?) => {
                    match dtype {
                        $(GgmlDType::$variant => dequantize_blocks::<$block>(bytes, cols, row, c0, c1, dst),)*
                        GgmlDType::F32 => dequantize_blocks::<f32>(bytes, cols, row, c0, c1, dst),
                    }
                };
            }
            blocks!(
                F16 => f16, BF16 => bf16, Q4_0 => BlockQ4_0, Q4_1 => BlockQ4_1,
                Q5_0 => BlockQ5_0, Q5_1 => BlockQ5_1, Q8_0 => BlockQ8_0, Q8_1 => BlockQ8_1,
                Q2K => BlockQ2K, Q3K => BlockQ3K, Q4K => BlockQ4K, Q5K => BlockQ5K,
                Q6K => BlockQ6K, Q8K => BlockQ8K,
            )
        }
    }
}

/// The parts' stored blocks, when every part is GGUF blocks.
fn all_blocks(parts: &[Matrix]) -> Option<Vec<&Arc<QTensor>>> {
    parts
        .iter()
        .map(|p| match &p.stored {
            Stored::Blocks(q) => Some(q),
            _ => None,
        })
        .collect()
}

/// Whether x Wᵀ for `n` rows goes to generation's integer prefill product
/// (`decode_dot::prefill`): the activations may be rounded, there are more rows than the
/// decoding dots take, the widest kernel runs the 256-bit integer paths
/// (`takes_256_bit_paths`, as the decoding dots of the blocks of 32 do), and every part is
/// GGUF blocks of a type it takes (the blocks of 32 and the K types).
fn takes_integer_prefill(parts: &[Matrix], n: usize, activations: Activations) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        activations == Activations::Rounded
            && n > decode_dot::MAX_INPUT_ROWS
            && decode_dot::takes_256_bit_paths(Kernel::best())
            && parts.iter().all(
                |p| matches!(&p.stored, Stored::Blocks(q) if decode_dot::prefill::takes(q.dtype())),
            )
            && decode_dot::prefill::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (parts, n, activations);
        false
    }
}

/// x Wᵀ (n rows) on the integer prefill product: every part is GGUF blocks it takes
/// (`takes_integer_prefill`).
#[cfg(target_arch = "x86_64")]
fn integer_prefill(parts: &[Matrix], x: &Tensor, n: usize) -> Result<Tensor> {
    let cols = parts[0].cols;
    let Some(stored) = all_blocks(parts) else {
        candle_core::bail!("the integer prefill product takes GGUF blocks only")
    };
    let data: Vec<_> = stored.iter().map(|q| q.data()).collect::<Result<_>>()?;
    let prefill_parts: Vec<decode_dot::prefill::Part> = data
        .iter()
        .zip(stored.iter().zip(parts))
        .map(|(bytes, (q, p))| decode_dot::prefill::Part {
            bytes,
            dtype: q.dtype(),
            rows: p.rows,
        })
        .collect();
    let rows = prefill_parts.iter().map(|p| p.rows).sum::<usize>();
    let out = with_slice(x, |x| {
        Ok(decode_dot::prefill::product(&prefill_parts, x, cols))
    })?;
    Tensor::from_vec(out, (n, rows), &Device::Cpu)
}

#[cfg(not(target_arch = "x86_64"))]
fn integer_prefill(_: &[Matrix], _: &Tensor, _: usize) -> Result<Tensor> {
    candle_core::bail!("the integer prefill product needs x86-64")
}

/// x Wᵀ for a few rows x (n ≤ MAX_INPUT_ROWS) and the parts stacked by rows, in one parallel
/// loop; None unless every part is GGUF blocks (half parts borrow their values through a lock
/// each, and f32 parts go to candle).
fn few_rows_forward(
    parts: &[Matrix],
    x: &Tensor,
    n: usize,
    (kernel, activations): (Kernel, Activations),
) -> Result<Option<Tensor>> {
    if parts.len() < 2 || n > decode_dot::MAX_INPUT_ROWS {
        return Ok(None);
    }
    let Some(stored) = all_blocks(parts) else {
        return Ok(None);
    };
    let cols = parts[0].cols;
    let data: Vec<_> = stored.iter().map(|q| q.data()).collect::<Result<_>>()?;
    let rows_of: Vec<_> = data
        .iter()
        .zip(&stored)
        .map(|(bytes, q)| {
            let values = Values::Blocks(bytes, q.dtype());
            move |r: usize, dst: &mut [f32]| dequantize(&values, cols, r, 0, cols, dst)
        })
        .collect();
    let product_parts: Vec<decode_dot::Part> = parts
        .iter()
        .zip(data.iter().zip(&stored))
        .zip(&rows_of)
        .map(|((p, (bytes, q)), row)| decode_dot::Part {
            blocks: Some((&bytes[..], q.dtype())),
            rows: p.rows,
            dequantize_row: row,
        })
        .collect();
    let rows = product_parts.iter().map(|p| p.rows).sum::<usize>();
    let out = with_slice(x, |x| {
        Ok(decode_dot::product(
            &product_parts,
            cols,
            x,
            kernel,
            activations,
        ))
    })?;
    Ok(Some(Tensor::from_vec(out, (n, rows), &Device::Cpu)?))
}

fn dequantize_blocks<B: GgmlType>(
    bytes: &[u8],
    cols: usize,
    row: usize,
    c0: usize,
    c1: usize,
    dst: &mut [f32],
) {
    let size = std::mem::size_of::<B>();
    assert_eq!(
        bytes.as_ptr() as usize % std::mem::align_of::<B>(),
        0,
        "quantized data is not aligned for its block type"
    );
    // SAFETY: candle stores these blocks as a Vec<B> (aligned, checked above); the block
    // types are plain old data.
    let blocks: &[B] =
        unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const B, bytes.len() / size) };
    let per_row = cols / B::BLCK_SIZE;
    let start = row * per_row + c0 / B::BLCK_SIZE;
    let end = row * per_row + c1 / B::BLCK_SIZE;
    if !decode_dot::dequantize_blocks(&bytes[start * size..end * size], B::DTYPE, dst) {
        B::to_float(&blocks[start..end], dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::tests::{max_abs, max_diff};

    fn random(dims: (usize, usize), seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..dims.0 * dims.1)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    /// Every kernel with f32 and with rounded activations.
    fn each_way(kernels: &[Kernel]) -> Vec<(Kernel, Activations)> {
        let ways = [Activations::Exact, Activations::Rounded];
        kernels.iter().flat_map(|&k| ways.map(|a| (k, a))).collect()
    }

    /// How far the few-rows product of `m` may sit from the panel product, of the largest
    /// value: f32 sums in another order, or rounded activations (`decode_dot::integer`, whose
    /// own tests hold them to their bound).
    fn tolerance(m: &Matrix, (kernel, activations): (Kernel, Activations)) -> f32 {
        let integer = matches!(&m.stored,
            Stored::Blocks(q) if decode_dot::rounding_group(q.dtype(), kernel).is_some());
        if integer && activations == Activations::Rounded {
            1e-4
        } else {
            2e-6
        }
    }

    /// Every storage the engine keeps, for a (rows, 512) matrix.
    fn stored_kinds(w: &Tensor) -> Vec<(String, Weight)> {
        let mut out = vec![
            (
                "f16".to_string(),
                Weight::from_tensor(w.to_dtype(DType::F16).unwrap()).unwrap(),
            ),
            (
                "bf16".to_string(),
                Weight::from_tensor(w.to_dtype(DType::BF16).unwrap()).unwrap(),
            ),
        ];
        for dtype in [
            GgmlDType::F16,
            GgmlDType::BF16,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let q = QTensor::quantize(w, dtype).unwrap();
            out.push((format!("gguf {dtype:?}"), Weight::from_qtensor(q).unwrap()));
        }
        out
    }

    #[test]
    fn panel_products_match_the_dequantized_matrix() {
        // Rows that do not fill a whole tile, and input counts on both sides of the
        // quantized-dot threshold.
        let w = random((300, 512), 1);
        for (name, weight) in stored_kinds(&w) {
            let plain = weight.dequantized().unwrap();
            for n in [7, 33] {
                let x = random((n, 512), 2);
                let dy = random((n, 300), 3);
                let f = weight.forward(&x).unwrap();
                let f_ref = plain.forward(&x).unwrap();
                assert!(max_diff(&f, &f_ref) < 1e-3, "{name}: forward, n = {n}");
                let b = weight.backward(&dy).unwrap();
                let b_ref = plain.backward(&dy).unwrap();
                assert!(max_diff(&b, &b_ref) < 1e-3, "{name}: backward, n = {n}");
            }
            let ids = [0u32, 299, 17];
            let rows = weight.select_rows(&ids).unwrap();
            let rows_ref = plain.select_rows(&ids).unwrap();
            assert!(max_diff(&rows, &rows_ref) < 1e-6, "{name}: rows");
        }
    }

    #[test]
    fn decoding_kernels_match_the_panel_product() {
        // Every storage, 1 to 4 input rows, through the register kernels (where the CPU has
        // them) and the portable one; the weight values are the same, only the order of the
        // sums differs.
        let w = random((300, 512), 4);
        let kernels = Kernel::available();
        if !Kernel::best().has_avx2() {
            eprintln!("this CPU has no AVX2+FMA: only the portable decoding kernel is tested");
        }
        for (name, weight) in stored_kinds(&w) {
            let m = &weight.parts[0];
            for n in 1..=decode_dot::MAX_INPUT_ROWS {
                let x = random((n, 512), 5 + n as u64);
                let panels = m.forward_using(&x, n, None).unwrap();
                let scale = max_abs(&panels);
                for dots in each_way(&kernels) {
                    let fast = m.forward_using(&x, n, Some(dots)).unwrap();
                    let d = max_diff(&fast, &panels);
                    assert!(
                        d <= tolerance(m, dots) * scale,
                        "{name}, {dots:?}, n = {n}: differs by {d} of {scale}"
                    );
                }
            }
        }
        // An odd number of blocks per row (the AVX-512 kernel takes blocks in pairs).
        let w = random((37, 17 * 32), 6);
        for dtype in decode_dot::tests::BLOCKS_OF_32_WITH_DOTS {
            let weight = Weight::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
            let m = &weight.parts[0];
            for n in 1..=decode_dot::MAX_INPUT_ROWS {
                let x = random((n, 17 * 32), 7 + n as u64);
                let panels = m.forward_using(&x, n, None).unwrap();
                let scale = max_abs(&panels);
                for dots in each_way(&kernels) {
                    let d = max_diff(&m.forward_using(&x, n, Some(dots)).unwrap(), &panels);
                    let tolerance = tolerance(m, dots);
                    assert!(d <= tolerance * scale, "{dtype:?}, {dots:?}, n = {n}: {d}");
                }
            }
        }
    }

    #[test]
    fn stacked_parts_behave_like_one_matrix() {
        let a = random((40, 256), 6);
        let b = random((24, 256), 7);
        let qa = Weight::from_qtensor(QTensor::quantize(&a, GgmlDType::Q4K).unwrap()).unwrap();
        let qb = Weight::from_qtensor(QTensor::quantize(&b, GgmlDType::Q6K).unwrap()).unwrap();
        let stacked = Weight::stack(vec![qa, qb]).unwrap();
        assert_eq!(stacked.dims(), (64, 256));
        assert_eq!(stacked.precision(), "q4k+q6k");
        let plain = stacked.dequantized().unwrap();
        let x = random((9, 256), 8);
        let dy = random((9, 64), 9);
        assert!(max_diff(&stacked.forward(&x).unwrap(), &plain.forward(&x).unwrap()) < 1e-3);
        assert!(
            max_diff(
                &stacked.backward(&dy).unwrap(),
                &plain.backward(&dy).unwrap()
            ) < 1e-3
        );
        let tail = stacked.narrow_rows(30, 20).unwrap();
        let tail_ref = plain.to_f32().unwrap().narrow(0, 30, 20).unwrap();
        assert!(max_diff(&tail.to_f32().unwrap(), &tail_ref) < 1e-6);
    }

    #[test]
    fn stacked_parts_share_one_decoding_product() {
        // q, k and v (or gate and up) of different sizes and storages, through one parallel
        // loop whose chunks cross the parts' borders, against each part on its own.
        let parts: Vec<Weight> = [
            (70, GgmlDType::Q4_1),
            (9, GgmlDType::Q8_0),
            (33, GgmlDType::Q4_0),
            (20, GgmlDType::Q4K),
            (13, GgmlDType::Q5_0),
            (11, GgmlDType::Q5_1),
            (6, GgmlDType::Q2K),
            (10, GgmlDType::Q3K),
            (7, GgmlDType::Q6K),
            (5, GgmlDType::Q5K),
        ]
        .iter()
        .enumerate()
        .map(|(i, &(rows, dtype))| {
            let w = random((rows, 256), 20 + i as u64);
            Weight::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap()
        })
        .collect();
        let stacked = Weight::stack(parts.clone()).unwrap();
        for n in 1..=decode_dot::MAX_INPUT_ROWS {
            let x = random((n, 256), 30 + n as u64);
            let alone: Vec<Tensor> = parts
                .iter()
                .map(|p| p.parts[0].forward_using(&x, n, None).unwrap())
                .collect();
            let want = Tensor::cat(&alone, 1).unwrap();
            let scale = max_abs(&want);
            for dots in each_way(&Kernel::available()) {
                let got = few_rows_forward(&stacked.parts, &x, n, dots)
                    .unwrap()
                    .expect("every part is GGUF blocks");
                assert_eq!(got.dims(), want.dims());
                let d = max_diff(&got, &want);
                // The rounded activations move the K-type parts' rows.
                let tolerance = match dots.1 {
                    Activations::Exact => 2e-6,
                    Activations::Rounded => 1e-4,
                };
                assert!(d <= tolerance * scale, "{dots:?}, n = {n}: {d} of {scale}");
            }
            // `forward_with` takes the activations as told: rounded or not; `forward` (every
            // pass but decoding's) never rounds them.
            for activations in [Activations::Exact, Activations::best()] {
                let got = stacked.forward_with(&x, activations).unwrap();
                assert!(max_diff(&got, &want) <= 1e-4 * scale, "{activations:?}");
            }
            let exact = stacked.forward(&x).unwrap();
            assert!(max_diff(&exact, &want) <= 2e-6 * scale, "n = {n}");
        }
    }

    #[test]
    fn permuted_quantized_rows_move_whole() {
        let w = random((8, 64), 10);
        let q = Weight::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()).unwrap();
        let order = [3, 0, 1, 2, 7, 6, 5, 4];
        let p = q.permute_rows(&order).unwrap().to_f32().unwrap();
        let full = q.to_f32().unwrap();
        for (i, &r) in order.iter().enumerate() {
            let d = max_diff(&p.narrow(0, i, 1).unwrap(), &full.narrow(0, r, 1).unwrap());
            assert_eq!(d, 0.0);
        }
    }
}
