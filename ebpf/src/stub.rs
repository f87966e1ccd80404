//! Without the `bpf` feature: no programs compiled in, every constructor says `NotBuilt`. The
//! types are uninhabited, so the methods cannot be reached.

use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::os::fd::AsFd;

use crate::{EbpfError, LookupStats, Proto, ReuseportStats};

pub(crate) fn probe() -> Result<(), EbpfError> {
    Err(EbpfError::NotBuilt)
}

pub(crate) enum Reuseport {}

impl Reuseport {
    pub(crate) fn attach<S: AsFd>(_: &[S], _: &[Option<u32>], _: u32) -> Result<Self, EbpfError> {
        Err(EbpfError::NotBuilt)
    }

    pub(crate) fn load_writer(&self, _: u32) -> Result<Writer, EbpfError> {
        match *self {}
    }

    pub(crate) fn stats(&self) -> ReuseportStats {
        match *self {}
    }
}

pub(crate) enum Writer {}

impl Writer {
    pub(crate) fn set(&mut self, _: u32) -> Result<(), EbpfError> {
        match *self {}
    }
}

pub(crate) enum Lookup {}

impl Lookup {
    pub(crate) fn attach<S: AsFd, U: AsFd>(
        _: RangeInclusive<u16>,
        _: IpAddr,
        _: &[S],
        _: &[U],
        _: &[Option<u32>],
    ) -> Result<Self, EbpfError> {
        Err(EbpfError::NotBuilt)
    }

    pub(crate) fn set_open(&mut self, _: Proto, _: u16, _: bool) -> Result<(), EbpfError> {
        match *self {}
    }

    pub(crate) fn is_open(&self, _: Proto, _: u16) -> bool {
        match *self {}
    }

    pub(crate) fn stats(&self) -> LookupStats {
        match *self {}
    }
}
