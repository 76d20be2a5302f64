//! Backing chains (libvirt external snapshots): `base <- s1 <- top`.
//!
//! Each overlay stores only the clusters written while it was the top
//! image; everything else is read from its backing file, which may itself
//! be an overlay or a raw file. The chain is therefore a stack of layers,
//! and "layer k" is what a guest saw when layer k was the active image.

use std::collections::HashSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::error::Qcow2Error;
use crate::extent::{self, DiffExtent, ExtentKind};
use crate::format::MAGIC;
use crate::image::{Qcow2Image, Unit, View};
use crate::source::ReadAt;

/// Maximum number of layers; deeper chains are refused (QEMU's own limit
/// is far lower in practice, and this bounds recursion while reading).
pub const MAX_CHAIN_DEPTH: usize = 256;

/// Image format of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerFormat {
    /// A qcow2 image.
    Qcow2,
    /// A raw image (only possible as the bottom layer).
    Raw,
}

/// Description of one layer of a [`Chain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// Path of the layer's file (backing names resolved against the
    /// overlay's directory).
    pub path: PathBuf,
    /// qcow2 or raw.
    pub format: LayerFormat,
    /// Guest-visible size of the layer.
    pub virtual_size: u64,
}

#[derive(Debug)]
enum Layer {
    Qcow2(Box<Qcow2Image>),
    Raw { file: File, size: u64 },
}

/// An opened backing chain; `layers()[0]` is the bottom-most image.
#[derive(Debug)]
pub struct Chain {
    infos: Vec<LayerInfo>,
    layers: Vec<Layer>,
}

/// Where the backing files of a chain may lie.
///
/// An image's header is written by whoever made the image; a hosting provider
/// replicates images its tenants uploaded, and `serve` lets remote readers read what the
/// store reads. Following any backing name would let an image's owner read any file the
/// snapsync process can (`../../../../etc/passwd` as a raw backing file), so by default
/// the chain stays inside one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackingRule {
    /// Every backing file must resolve (after symlinks) inside this directory and be a
    /// regular file.
    Confined(PathBuf),
    /// Backing files may lie anywhere and may be block devices: for trusted images only.
    Any,
}

impl BackingRule {
    /// The default rule for `top`: its own directory.
    pub fn beside(top: &Path) -> Result<Self, Qcow2Error> {
        let canonical = fs::canonicalize(top)
            .map_err(|e| Qcow2Error::io(format!("resolving {}", top.display()), e))?;
        Ok(BackingRule::Confined(
            canonical.parent().unwrap_or(Path::new("/")).to_path_buf(),
        ))
    }

    /// Why `canonical` (the resolved backing file `backing` of `image`) may not be a
    /// layer, if it may not.
    fn refusal(&self, canonical: &Path, file_type: fs::FileType) -> Option<String> {
        use std::os::unix::fs::FileTypeExt;
        let kind = if file_type.is_file() {
            None
        } else if file_type.is_block_device() {
            Some("a block device")
        } else if file_type.is_char_device() {
            Some("a character device")
        } else if file_type.is_fifo() {
            Some("a FIFO")
        } else if file_type.is_socket() {
            Some("a socket")
        } else if file_type.is_dir() {
            Some("a directory")
        } else {
            Some("not a regular file")
        };
        match self {
            BackingRule::Any => match kind {
                None | Some("a block device") => None,
                Some(kind) => Some(format!(
                    "{} is {kind}; a backing file must be a regular file or a block device",
                    canonical.display()
                )),
            },
            BackingRule::Confined(root) => {
                if !canonical.starts_with(root) {
                    Some(format!(
                        "it resolves to {}, outside {}; backing files must lie inside the \
                         store's directory (`?backing=any` on the qcow2: URL allows any \
                         path, for trusted images only)",
                        canonical.display(),
                        root.display()
                    ))
                } else {
                    kind.map(|kind| {
                        format!(
                            "{} is {kind}; a backing file must be a regular file",
                            canonical.display()
                        )
                    })
                }
            }
        }
    }
}

/// Open a layer's file without ever blocking on it: a FIFO opened for reading waits for
/// a writer, so the file is opened non-blocking and its type checked on the open file.
fn open_layer(path: &Path) -> Result<(File, fs::Metadata), Qcow2Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Qcow2Error::io(format!("opening {}", path.display()), e))?;
    let md = file
        .metadata()
        .map_err(|e| Qcow2Error::io(format!("reading the type of {}", path.display()), e))?;
    Ok((file, md))
}

fn probe_is_qcow2(file: &File, path: &Path) -> Result<bool, Qcow2Error> {
    let size =
        ReadAt::size(file).map_err(|e| Qcow2Error::io(format!("probing {}", path.display()), e))?;
    if size < 4 {
        return Ok(false);
    }
    let mut m = [0u8; 4];
    ReadAt::read_exact_at(file, &mut m, 0)
        .map_err(|e| Qcow2Error::io(format!("probing {}", path.display()), e))?;
    Ok(m == MAGIC)
}

/// The next layer below an image: its path and format name.
struct Below {
    image: PathBuf,
    name: String,
    format: Option<String>,
}

impl Chain {
    /// Open `top` and every backing file below it, each allowed by `rule`. Refuses
    /// cycles, chains deeper than [`MAX_CHAIN_DEPTH`], protocol/JSON backing names and
    /// formats other than qcow2 and raw.
    pub fn open(top: &Path, rule: &BackingRule) -> Result<Self, Qcow2Error> {
        let mut infos = Vec::new();
        let mut layers = Vec::new();
        let mut seen = HashSet::new();
        let mut path = top.to_path_buf();
        let mut below: Option<Below> = None;
        loop {
            if layers.len() >= MAX_CHAIN_DEPTH {
                return Err(Qcow2Error::too_large(format!(
                    "backing chain deeper than {MAX_CHAIN_DEPTH} layers"
                )));
            }
            let canonical = fs::canonicalize(&path)
                .map_err(|e| Qcow2Error::io(format!("resolving {}", path.display()), e))?;
            let (file, md) = open_layer(&canonical)?;
            if let Some(b) = &below {
                if let Some(reason) = rule.refusal(&canonical, md.file_type()) {
                    return Err(Qcow2Error::BackingRefused {
                        image: b.image.display().to_string(),
                        backing: b.name.clone(),
                        reason,
                    });
                }
            } else if !md.is_file()
                && !std::os::unix::fs::FileTypeExt::is_block_device(&md.file_type())
            {
                return Err(Qcow2Error::invalid(format!(
                    "{} is not a regular file or a block device",
                    path.display()
                )));
            }
            if !seen.insert(canonical.clone()) {
                return Err(Qcow2Error::malformed(
                    format!("backing chain cycle: {} appears twice", canonical.display()),
                    0,
                ));
            }
            let is_qcow2 = match below.as_ref().and_then(|b| b.format.as_deref()) {
                Some("qcow2") => true,
                Some("raw") => false,
                Some(other) => {
                    return Err(Qcow2Error::unsupported(format!(
                        "backing file format '{other}' (only qcow2 and raw)"
                    )))
                }
                None => probe_is_qcow2(&file, &path)?,
            };
            if !is_qcow2 {
                let size = ReadAt::size(&file).map_err(|e| {
                    Qcow2Error::io(format!("reading size of {}", path.display()), e)
                })?;
                infos.push(LayerInfo {
                    path,
                    format: LayerFormat::Raw,
                    virtual_size: size,
                });
                layers.push(Layer::Raw { file, size });
                break;
            }
            let img = Qcow2Image::from_file(file, &path)?;
            infos.push(LayerInfo {
                path: path.clone(),
                format: LayerFormat::Qcow2,
                virtual_size: img.virtual_size(),
            });
            let next = img
                .backing_file()
                .map(|b| (b.to_string(), img.backing_format().map(str::to_string)));
            layers.push(Layer::Qcow2(Box::new(img)));
            let Some((name, format)) = next else { break };
            if name.starts_with("json:") || (name.contains("://") || name.starts_with("nbd:")) {
                return Err(Qcow2Error::unsupported(format!(
                    "backing file '{name}' is not a plain path"
                )));
            }
            let p = Path::new(&name);
            let next_path = if p.is_absolute() {
                p.to_path_buf()
            } else {
                path.parent().unwrap_or(Path::new(".")).join(p)
            };
            below = Some(Below {
                image: std::mem::replace(&mut path, next_path),
                name,
                format,
            });
        }
        infos.reverse();
        layers.reverse();
        Ok(Chain { infos, layers })
    }

    /// The layers, bottom-most first.
    pub fn layers(&self) -> &[LayerInfo] {
        &self.infos
    }

    /// The parsed qcow2 image of layer `k` (None for raw layers or out of range).
    pub fn image(&self, k: usize) -> Option<&Qcow2Image> {
        match self.layers.get(k) {
            Some(Layer::Qcow2(img)) => Some(img),
            _ => None,
        }
    }

    /// Sum of metadata bytes read by all qcow2 layers.
    pub fn metadata_bytes_read(&self) -> u64 {
        (0..self.layers.len())
            .filter_map(|k| self.image(k))
            .map(Qcow2Image::metadata_bytes_read)
            .sum()
    }

    fn check_layer(&self, k: usize) -> Result<(), Qcow2Error> {
        if k >= self.layers.len() {
            return Err(Qcow2Error::invalid(format!(
                "layer {k} out of range ({} layers)",
                self.layers.len()
            )));
        }
        Ok(())
    }

    /// Read guest data as seen at layer `layer` (the chain up to and
    /// including it). Ranges a layer does not allocate come from the layer
    /// below; beyond the lower layer's size they read as zeros, as in QEMU.
    pub fn read_at(&self, layer: usize, offset: u64, buf: &mut [u8]) -> Result<(), Qcow2Error> {
        self.check_layer(layer)?;
        let size = self.infos[layer].virtual_size;
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > size)
        {
            return Err(Qcow2Error::invalid(format!(
                "read of {} bytes at {offset} is beyond the virtual size {size} of layer {layer}",
                buf.len()
            )));
        }
        self.read_layer(layer, View::Active, offset, buf)
    }

    /// Read guest data as seen in `view` of layer `layer`, i.e. an internal
    /// snapshot of that layer over the (active) layers below it: what QEMU
    /// shows after `qemu-img snapshot -a` on an overlay. `View::Active` is
    /// [`Self::read_at`]. Raw layers have no snapshots.
    pub fn read_view_at(
        &self,
        layer: usize,
        view: View,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), Qcow2Error> {
        self.check_layer(layer)?;
        let size = match (&self.layers[layer], view) {
            (Layer::Qcow2(img), v) => img.view_size(v)?,
            (Layer::Raw { size, .. }, View::Active) => *size,
            (Layer::Raw { .. }, View::Snapshot(_)) => {
                return Err(Qcow2Error::invalid(format!(
                    "layer {layer} is a raw file, which has no internal snapshots"
                )))
            }
        };
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > size)
        {
            return Err(Qcow2Error::invalid(format!(
                "read of {} bytes at {offset} is beyond the virtual size {size} of layer {layer} ({view:?})",
                buf.len()
            )));
        }
        self.read_layer(layer, view, offset, buf)
    }

    fn read_layer(
        &self,
        k: usize,
        view: View,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), Qcow2Error> {
        match &self.layers[k] {
            Layer::Raw { file, size } => {
                let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
                let (head, tail) = buf.split_at_mut(avail);
                ReadAt::read_exact_at(file, head, offset).map_err(|e| {
                    Qcow2Error::io(format!("reading {}", self.infos[k].path.display()), e)
                })?;
                tail.fill(0);
                Ok(())
            }
            Layer::Qcow2(img) => {
                img.map_range(view, offset, buf.len() as u64, &mut |g, n, unit, within| {
                    let s = (g - offset) as usize;
                    let dst = &mut buf[s..s + n as usize];
                    if unit == Unit::Unalloc && k > 0 {
                        let below = self.infos[k - 1].virtual_size;
                        let avail = below.saturating_sub(g).min(n) as usize;
                        let (head, tail) = dst.split_at_mut(avail);
                        // Entirely beyond the smaller layer below: zeros, and
                        // nothing to ask it (an empty read past its end is an error).
                        if !head.is_empty() {
                            self.read_layer(k - 1, View::Active, g, head)?;
                        }
                        tail.fill(0);
                        Ok(())
                    } else {
                        img.read_unit(unit, within, dst)
                    }
                })
            }
        }
    }

    /// Metadata-only difference between layer `to` and an older layer
    /// `from`: the union of what layers `from+1..=to` allocate, each range
    /// tagged by the topmost layer covering it (Data, or Zero for zero
    /// clusters). `from: None` gives the full allocation of layers `0..=to`
    /// (a raw layer counts as fully allocated).
    pub fn diff(&self, to: usize, from: Option<usize>) -> Result<Vec<DiffExtent>, Qcow2Error> {
        self.check_layer(to)?;
        if let Some(f) = from {
            if f >= to {
                return Err(Qcow2Error::invalid(format!(
                    "diff from layer {f} to layer {to}: 'from' must be older (smaller)"
                )));
            }
        }
        let lo = from.map_or(0, |f| f + 1);
        let mut covered: Vec<(u64, u64)> = Vec::new();
        let mut result = Vec::new();
        // Content of layer j is visible at layer `to` only below the
        // smallest virtual size of layers j..=to.
        let mut visible = self.infos[to].virtual_size;
        for j in (lo..=to).rev() {
            visible = visible.min(self.infos[j].virtual_size);
            let mut ext = match &self.layers[j] {
                Layer::Qcow2(img) => img.allocated(View::Active)?,
                Layer::Raw { size, .. } if *size > 0 => vec![DiffExtent {
                    offset: 0,
                    len: *size,
                    kind: ExtentKind::Data,
                }],
                Layer::Raw { .. } => Vec::new(),
            };
            extent::clip(&mut ext, visible);
            let ranges: Vec<(u64, u64)> = ext.iter().map(|e| (e.offset, e.end())).collect();
            result.extend(extent::subtract(&ext, &covered));
            covered = extent::union(&covered, &ranges);
        }
        if let Some(f) = from {
            // An intermediate layer smaller than `from` truncated its data:
            // that range now reads as zeros.
            let top = self.infos[f].virtual_size.min(self.infos[to].virtual_size);
            if visible < top {
                let z = [DiffExtent {
                    offset: visible,
                    len: top - visible,
                    kind: ExtentKind::Zero,
                }];
                result.extend(extent::subtract(&z, &covered));
            }
        }
        Ok(extent::normalize(result))
    }
}
