//! Reading GGUF files: metadata and tensors, with errors a person can act on.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use super::EngineError;

/// An opened GGUF file: its parsed header, and a reader for tensor data.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, EngineError> {
        let file = File::open(path).map_err(|e| EngineError::ModelFile {
            path: path.to_owned(),
            reason: format!("cannot open: {e}"),
        })?;
        let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut reader = BufReader::new(file);
        let mut magic = [0u8; 4];
        if reader.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
            return Err(EngineError::ModelFile {
                path: path.to_owned(),
                reason: "not a GGUF file (bad magic bytes)".into(),
            });
        }
        reader.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
        let content = Content::read(&mut reader).map_err(|e| EngineError::ModelFile {
            path: path.to_owned(),
            reason: format!("corrupt GGUF header: {e}"),
        })?;
        // A truncated download parses fine up to the header; catch it before reading tensors.
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            let bytes = elems / block * info.ggml_dtype.type_size();
            let end = content.tensor_data_offset + info.offset + bytes as u64;
            if end > file_len {
                return Err(EngineError::ModelFile {
                    path: path.to_owned(),
                    reason: format!(
                        "truncated: tensor `{name}` ends at byte {end} but the file has {file_len} bytes"
                    ),
                });
            }
        }
        Ok(Self {
            path: path.to_owned(),
            content,
            reader,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn get(&self, key: &str) -> Result<&Value, EngineError> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| self.bad(format!("missing metadata key `{key}`")))
    }

    pub fn string(&self, key: &str) -> Result<String, EngineError> {
        self.get(key)?
            .to_string()
            .cloned()
            .map_err(|e| self.bad(format!("`{key}`: {e}")))
    }

    pub fn opt_string(&self, key: &str) -> Option<String> {
        self.content
            .metadata
            .get(key)
            .and_then(|v| v.to_string().ok().cloned())
    }

    pub fn u32(&self, key: &str) -> Result<u32, EngineError> {
        let v = self.get(key)?;
        v.to_u32()
            .or_else(|_| v.to_u64().map(|x| x as u32))
            .or_else(|_| v.to_i32().map(|x| x as u32))
            .map_err(|e| self.bad(format!("`{key}`: {e}")))
    }

    pub fn opt_u32(&self, key: &str) -> Option<u32> {
        self.get(key).ok().and_then(|v| {
            v.to_u32()
                .ok()
                .or_else(|| v.to_u64().ok().map(|x| x as u32))
                .or_else(|| v.to_i32().ok().map(|x| x as u32))
        })
    }

    pub fn opt_f32(&self, key: &str) -> Option<f32> {
        self.get(key).ok().and_then(|v| v.to_f32().ok())
    }

    pub fn opt_bool(&self, key: &str) -> Option<bool> {
        self.get(key).ok().and_then(|v| v.to_bool().ok())
    }

    pub fn string_array(&self, key: &str) -> Result<Vec<String>, EngineError> {
        let values = self
            .get(key)?
            .to_vec()
            .map_err(|e| self.bad(format!("`{key}`: {e}")))?;
        values
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|e| self.bad(format!("`{key}`: {e}")))
            })
            .collect()
    }

    pub fn number_array(&self, key: &str) -> Result<Vec<f64>, EngineError> {
        let values = self
            .get(key)?
            .to_vec()
            .map_err(|e| self.bad(format!("`{key}`: {e}")))?;
        values
            .iter()
            .map(|v| match v {
                Value::U8(x) => Ok(*x as f64),
                Value::I8(x) => Ok(*x as f64),
                Value::U16(x) => Ok(*x as f64),
                Value::I16(x) => Ok(*x as f64),
                Value::U32(x) => Ok(*x as f64),
                Value::I32(x) => Ok(*x as f64),
                Value::U64(x) => Ok(*x as f64),
                Value::I64(x) => Ok(*x as f64),
                Value::F32(x) => Ok(*x as f64),
                Value::F64(x) => Ok(*x),
                other => Err(self.bad(format!("`{key}`: not a number: {other:?}"))),
            })
            .collect()
    }

    pub fn qtensor(&mut self, name: &str) -> Result<QTensor, EngineError> {
        if !self.content.tensor_infos.contains_key(name) {
            return Err(self.bad(format!("missing tensor `{name}`")));
        }
        self.content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| EngineError::ModelFile {
                path: self.path.clone(),
                reason: format!("cannot read tensor `{name}`: {e}"),
            })
    }

    /// A tensor dequantized to f32, in the GGUF's own shape (rows = output features).
    pub fn f32_tensor(&mut self, name: &str) -> Result<Tensor, EngineError> {
        let q = self.qtensor(name)?;
        let t = q
            .dequantize(&Device::Cpu)
            .map_err(|e| self.bad(format!("cannot dequantize `{name}`: {e}")))?;
        // Corrupt data shows as NaN or infinity: refuse it here, naming the tensor, rather
        // than let it turn every score into NaN.
        if !all_finite(&t) {
            return Err(self.bad(format!(
                "tensor `{name}` holds NaN or infinite values: the file is corrupt"
            )));
        }
        Ok(t)
    }

    pub fn bad(&self, reason: String) -> EngineError {
        EngineError::ModelFile {
            path: self.path.clone(),
            reason,
        }
    }
}

/// Whether every value of a freshly dequantized (contiguous f32) tensor is finite.
fn all_finite(t: &Tensor) -> bool {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
            let start = layout.start_offset();
            v[start..start + t.elem_count()]
                .iter()
                .all(|x| x.is_finite())
        }
        _ => true,
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> EngineError + '_ {
    move |e| EngineError::ModelFile {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}
