//! Temporary stub of the contract (replaced by helper E's crate).
#![allow(missing_docs, clippy::missing_errors_doc)]
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::os::fd::AsFd;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("built without the bpf feature")]
    NotBuilt,
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Map(String),
}

pub fn probe() -> Result<(), EbpfError> {
    Err(EbpfError::NotBuilt)
}

#[derive(Debug, Default, Clone, Copy)]
pub struct ReuseportStats {
    pub local: u64,
    pub no_worker: u64,
    pub busy: u64,
}
#[derive(Debug, Default, Clone, Copy)]
pub struct LookupStats {
    pub tcp_steered: u64,
    pub udp_steered: u64,
    pub tcp_refused: u64,
    pub udp_refused: u64,
}

#[derive(Debug)]
pub struct ReuseportSteering;
impl ReuseportSteering {
    pub fn attach<S: AsFd>(_l: &[S], _c: &[Option<u32>], _b: u32) -> Result<Self, EbpfError> {
        Err(EbpfError::NotBuilt)
    }
    pub fn load_writer(&self, _w: u32) -> Result<LoadWriter, EbpfError> {
        Err(EbpfError::NotBuilt)
    }
    pub fn stats(&self) -> ReuseportStats {
        ReuseportStats::default()
    }
}
#[derive(Debug)]
pub struct LoadWriter;
impl LoadWriter {
    pub fn set(&mut self, _p: u32) -> Result<(), EbpfError> {
        Ok(())
    }
}

#[derive(Debug)]
pub struct LeasePortSteering;
impl LeasePortSteering {
    pub fn attach<S: AsFd, U: AsFd>(
        _p: RangeInclusive<u16>,
        _ip: IpAddr,
        _t: &[S],
        _u: &[U],
        _c: &[Option<u32>],
    ) -> Result<Self, EbpfError> {
        Err(EbpfError::NotBuilt)
    }
    pub fn open(&mut self, _p: Proto, _port: u16) -> Result<(), EbpfError> {
        Ok(())
    }
    pub fn close(&mut self, _p: Proto, _port: u16) -> Result<(), EbpfError> {
        Ok(())
    }
    pub fn stats(&self) -> LookupStats {
        LookupStats::default()
    }
}
