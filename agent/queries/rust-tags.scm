; Rust definitions: free and nested fns (function), fns in impl and trait bodies (method), structs and unions,
; enums, traits, type aliases and associated types (type), const and static items (constant), mods, macro_rules!.

(source_file (function_item name: (identifier) @name) @definition.function)
(mod_item body: (declaration_list (function_item name: (identifier) @name) @definition.function))
(block (function_item name: (identifier) @name) @definition.function)
(foreign_mod_item body: (declaration_list (function_signature_item name: (identifier) @name) @definition.function))

(impl_item body: (declaration_list (function_item name: (identifier) @name) @definition.method))
(impl_item body: (declaration_list (function_signature_item name: (identifier) @name) @definition.method))
(trait_item body: (declaration_list (function_item name: (identifier) @name) @definition.method))
(trait_item body: (declaration_list (function_signature_item name: (identifier) @name) @definition.method))

(struct_item name: (type_identifier) @name) @definition.struct
(union_item name: (type_identifier) @name) @definition.struct
(enum_item name: (type_identifier) @name) @definition.enum
(trait_item name: (type_identifier) @name) @definition.trait
(type_item name: (type_identifier) @name) @definition.type
(associated_type name: (type_identifier) @name) @definition.type

(const_item name: (identifier) @name) @definition.constant
(static_item name: (identifier) @name) @definition.constant

(mod_item name: (identifier) @name) @definition.module
(macro_definition name: (identifier) @name) @definition.macro
