// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the library's integration tests share.

pub mod recorder;
